"""The DiffusionInst model: encoder, dynamic head, box diffusion, sampler, criterion and rendering.

Public API::

    model = build_model(cfg.model)                          # DiffusionInst(nn.Module)
    losses = model(images, image_sizes, targets, noise)     # train: dict of weighted loss terms
    encoded = model.encode(images, image_sizes)             # once per image
    dets = model.sample(encoded, sampler_cfg, noise)        # list[Detections], input frame
    out = postprocess(dets[i], input_size, output_size)     # boxes/scores/labels/masks, output frame
    results = model.predict(images, image_sizes, output_sizes, sampler_cfg, noise)
"""

from diffusioninst.model.build import build_model
from diffusioninst.model.detector import DiffusionInst
from diffusioninst.model.dynamic_mask_head import DynamicMaskHead
from diffusioninst.model.noise import GeneratorNoise, NoiseSource, ReplayNoise
from diffusioninst.model.postprocess import postprocess
from diffusioninst.model.structures import Detections, Encoded

__all__ = [
    "Detections",
    "DiffusionInst",
    "DynamicMaskHead",
    "Encoded",
    "GeneratorNoise",
    "NoiseSource",
    "ReplayNoise",
    "build_model",
    "postprocess",
]
