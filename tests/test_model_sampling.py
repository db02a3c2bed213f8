"""Inference: batched sampling, sampler flags, rendering, predict()."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from model_helpers import (
    batch,
    single_thread,  # noqa: F401 (autouse fixture)
    tiny_model,
)

from diffusioninst.config.schema import SamplerConfig
from diffusioninst.model import Detections, GeneratorNoise, ReplayNoise, postprocess


@pytest.fixture(scope="module")
def setup():
    model = tiny_model(class_bias=0.0)
    images, sizes, _ = batch([(64, 96), (80, 70), (50, 64)])
    return model, model.encode(images, sizes), images, sizes


def _same(a: Detections, b: Detections) -> None:
    for field in ("boxes", "scores", "labels", "kernels"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert a.image_size == b.image_size


@pytest.mark.parametrize("steps", [1, 3])
def test_batched_sampling_equals_one_by_one(setup, steps):
    model, enc, _, _ = setup
    cfg = SamplerConfig(steps=steps)
    one_by_one = model.sample(enc, cfg, [GeneratorNoise(10 + i) for i in range(3)], record=True)
    batched = model.sample(
        enc, dataclasses.replace(cfg, batched=True), [GeneratorNoise(10 + i) for i in range(3)], record=True
    )
    kept = [[int(s["keep"].sum()) for s in d.trace["steps"]] for d in batched]
    if steps > 1:
        assert len({k[0] for k in kept}) > 1, f"renewal should keep different counts per image here: {kept}"
    for a, b in zip(one_by_one, batched):
        _same(a, b)


def test_several_step_counts_from_one_encoding_are_reproducible(setup):
    model, enc, _, _ = setup
    for steps in (1, 2, 4):
        cfg = SamplerConfig(steps=steps, seed=7)
        first, second = model.sample(enc, cfg), model.sample(enc, cfg)
        for a, b in zip(first, second):
            _same(a, b)
            assert len(a.trace or {}) == 0  # nothing recorded unless asked


def test_ensemble_last_step_flag(setup):
    model, enc, _, _ = setup
    single = enc.select(0)
    base = SamplerConfig(steps=3)
    off = model.sample(single, base, GeneratorNoise(1), record=True)[0]
    on = model.sample(single, dataclasses.replace(base, ensemble_last_step=True), GeneratorNoise(1), record=True)[0]
    n = model.num_proposals
    assert len(off.trace["members"]) == 2 and len(on.trace["members"]) == 3  # official drops the last step
    assert sum(len(m["scores"]) for m in on.trace["members"]) == 3 * n
    for a, b in zip(off.trace["members"], on.trace["members"][:2]):
        assert torch.equal(a["scores"], b["scores"])
    assert len(on) >= len(off)


def test_eta_zero_is_deterministic_given_the_initial_boxes(setup):
    model, enc, _, _ = setup
    single = enc.select(1)
    n = model.num_proposals
    start = torch.randn(1, n, 4, generator=torch.Generator().manual_seed(0))

    def run(eta: float, other: float) -> Detections:
        # same initial boxes; the per-step DDIM noise differs between the two runs
        values = [start] + [torch.full((1, n, 4), other)] * 4
        cfg = SamplerConfig(steps=3, eta=eta, box_renewal=False)
        return model.sample(single, cfg, ReplayNoise(values))[0]

    _same(run(0.0, 1.0), run(0.0, -1.0))
    assert not torch.equal(run(1.0, 1.0).boxes, run(1.0, -1.0).boxes)


def test_nms_off_and_detection_cap(setup):
    model, enc, _, _ = setup
    single = enc.select(0)
    full = model.sample(single, SamplerConfig(use_nms=False), GeneratorNoise(3))[0]
    assert len(full) == model.num_proposals and bool((full.scores[:-1] >= full.scores[1:]).all())
    capped = model.sample(single, SamplerConfig(max_detections=4), GeneratorNoise(3))[0]
    assert len(capped) == 4 and bool((capped.scores[:-1] >= capped.scores[1:]).all())


def test_sampler_num_proposals_draws_that_many_boxes(setup):
    model, enc, _, _ = setup
    single = enc.select(0)
    default = model.sample(single, SamplerConfig(use_nms=False), GeneratorNoise(3), record=True)[0]
    same = model.sample(single, SamplerConfig(use_nms=False, num_proposals=model.num_proposals), GeneratorNoise(3))[0]
    _same(default, same)  # null = the trained count, as official
    more = model.sample(single, SamplerConfig(use_nms=False, num_proposals=40), GeneratorNoise(3), record=True)[0]
    assert more.trace["steps"][0]["x_t"].shape == (40, 4) and len(more) == 40  # top-40 of the 40 x K scores
    assert default.trace["steps"][0]["x_t"].shape == (model.num_proposals, 4)


def test_windowed_rendering_equals_the_full_image_pipeline(setup):
    model, enc, _, _ = setup
    det = model.sample(enc.select(0), SamplerConfig(), GeneratorNoise(5))[0]
    g = torch.Generator().manual_seed(0)
    m = len(det)
    xy = torch.rand(m, 2, generator=g) * 140 - 20  # some boxes stick out of the 64 x 96 image, some are tiny
    wh = torch.rand(m, 2, generator=g) ** 2 * 80
    det = dataclasses.replace(det, boxes=torch.cat([xy, xy + wh], 1))
    for out_size in [(64, 96), (97, 131), (40, 55)]:
        fast = postprocess(det, (64, 96), out_size, mask_head=model.mask_head)
        ref = postprocess(det, (64, 96), out_size, mask_head=model.mask_head, reference=True)
        assert torch.equal(fast["masks"], ref["masks"]) and torch.equal(fast["boxes"], ref["boxes"])
        assert fast["masks"].shape[1:] == out_size and fast["masks"].dtype == torch.bool
        b = fast["boxes"]
        assert bool(((b[:, 2] - b[:, 0]) > 0).all()) and float(b[:, 2].max()) <= out_size[1]
        outside = torch.ones_like(fast["masks"])
        for k, (x1, y1, x2, y2) in enumerate(b.long().tolist()):
            outside[k, y1:y2, x1:x2] = False
        assert not bool((fast["masks"] & outside).any()), "masks are zero outside their box"


def test_predict_returns_output_frame_results(setup):
    model, _, images, sizes = setup
    outs = model.predict(images, sizes, [(128, 192), (80, 70), (100, 128)], SamplerConfig(steps=2), noise=None)
    assert len(outs) == 3
    for out, (h, w) in zip(outs, [(128, 192), (80, 70), (100, 128)]):
        assert out["masks"].shape[1:] == (h, w)
        assert out["boxes"].dtype == torch.float32 and out["labels"].dtype == torch.int64
        assert float(out["boxes"][:, 0::2].max()) <= w and float(out["boxes"][:, 1::2].max()) <= h
