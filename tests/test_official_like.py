"""The speed benchmark's official order of work (benchmarks/official_like.py) must compute what our model does.

`benchmarks/model_speed.py` times training both ways on the same machine; the comparison only means
something if the official-style pooling (detectron2 ROIPooler over torchvision's autograd RoIAlign), sliced
DynamicConv parameters and grouped-conv mask head give our losses and gradients.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from model_helpers import batch, single_thread, tiny_config  # noqa: F401 (autouse fixture)

from diffusioninst.model import build_model
from diffusioninst.model.pooler import MultiLevelRoIAlign

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from official_like import losses_and_grads, official_like_training


def _losses_and_grads(model, images, sizes, targets, record=None):
    return losses_and_grads(model, images, sizes, targets, seed=3, record=record)


def test_official_order_of_work_gives_our_losses_and_gradients():
    torch.manual_seed(0)
    model = build_model(tiny_config(num_proposals=24)).train()
    # two image sizes and boxes of 10-50% of the image: the proposals fall on several pyramid levels
    images, sizes, targets = batch([(96, 128), (128, 96)], seed=1, instances=3)
    record: dict = {}
    ours_losses, ours_grads = _losses_and_grads(model, images, sizes, targets, record)
    pooler, num_levels = model.head.pooler, len(model.cfg.head.in_features)
    levels = {
        int(level)
        for stage in record["head"]["stages"]
        for level in pooler.rois_and_levels(stage["in_boxes"], num_levels)[1]
    }
    assert len(levels) > 1  # the per-level scatter of both poolers is exercised
    with official_like_training(model):
        assert not isinstance(model.head.pooler, MultiLevelRoIAlign)
        off_losses, off_grads = _losses_and_grads(model, images, sizes, targets)
    assert set(off_losses) == set(ours_losses) and len(off_losses) == 8
    for key, value in off_losses.items():
        torch.testing.assert_close(ours_losses[key], value, rtol=1e-5, atol=1e-7, msg=key)
    assert sorted(off_grads) == sorted(ours_grads)
    flat_ours = torch.cat([ours_grads[n].flatten() for n in off_grads])
    flat_off = torch.cat([off_grads[n].flatten() for n in off_grads])
    assert float((flat_ours - flat_off).norm() / flat_off.norm()) < 1e-5

    # the patches are gone after the block: our pooler, split Linear and matmul mask head again
    assert isinstance(model.head.pooler, MultiLevelRoIAlign)
    assert all("forward" not in vars(stage.dynamic_conv) for stage in model.head.stages)
    again, _ = _losses_and_grads(model, images, sizes, targets)
    for key, value in again.items():
        assert torch.equal(value, ours_losses[key]), key
