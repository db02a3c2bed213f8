"""Training forward: loss keys, edge cases (no instances, boxes outside, G > N), flags, bad inputs, learning."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from model_helpers import (
    batch,
    single_thread,  # noqa: F401 (autouse fixture)
    tiny_config,
    tiny_model,
)

from diffusioninst.config.schema import LossConfig, SamplerConfig
from diffusioninst.model import GeneratorNoise, build_model


def _train_model(**loss):
    torch.manual_seed(0)
    cfg = tiny_config()
    if loss:
        cfg = dataclasses.replace(cfg, loss=LossConfig(**loss))
    return build_model(cfg).train()


def _noise(n: int, seed: int = 0):
    return [GeneratorNoise(seed + i) for i in range(n)]


def test_loss_keys_weights_and_backward():
    model = _train_model()
    images, sizes, targets = batch([(64, 96), (80, 70)])
    record: dict = {}
    losses = model(images, sizes, targets, noise=_noise(2), record=record)
    expected = {f"loss_{k}{s}" for k in ("ce", "bbox", "giou", "masks") for s in ("", "_0")}
    assert set(losses) == expected
    for key, value in losses.items():
        raw = record["raw"][key]
        factor = {"ce": 2.0, "bbox": 5.0, "giou": 2.0, "masks": 1.0}[key.split("_")[1]]
        assert torch.isfinite(value) and torch.allclose(value, raw * factor)
    sum(losses.values()).backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert trainable == [], f"parameters without gradient: {trainable[:5]}"


def test_flags_deep_supervision_and_aux_masks():
    images, sizes, targets = batch([(64, 64)])
    keys = set(_train_model(aux_mask_loss=False)(images, sizes, targets, noise=_noise(1)))
    assert "loss_masks_0" not in keys and "loss_ce_0" in keys
    keys = set(_train_model(deep_supervision=False)(images, sizes, targets, noise=_noise(1)))
    assert keys == {"loss_ce", "loss_bbox", "loss_giou", "loss_masks"}


def test_images_without_instances_train_on_a_fake_gt():
    model = _train_model()
    images, sizes, targets = batch([(64, 64), (64, 64)])
    targets[0] = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.long),
        "masks": torch.zeros(0, 64, 64),
    }
    record: dict = {}
    losses = model(images, sizes, targets, noise=_noise(2), record=record)
    assert torch.allclose(record["corrupted"][0].x_start[0], torch.tensor([0.0, 0.0, 2.0, 2.0]))  # [.5,.5,1,1]
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    # the whole batch empty: box/mask terms are exactly 0 but keep the graph
    empty = [targets[0], targets[0]]
    losses = model(images, sizes, empty, noise=_noise(2))
    assert losses["loss_bbox"].item() == 0 and losses["loss_masks"].item() == 0 and losses["loss_ce"].item() > 0
    sum(losses.values()).backward()


def test_boxes_outside_the_image_are_clipped_and_empty_ones_dropped():
    model = _train_model()
    images, sizes, targets = batch([(64, 64)])
    targets[0]["boxes"] = torch.tensor([[-10.0, 5.0, 30.0, 90.0], [70.0, 70.0, 80.0, 80.0]])
    targets[0]["masks"] = torch.ones(2, 64, 64, dtype=torch.uint8)
    record: dict = {}
    with pytest.warns(UserWarning, match="dropped 1 instance"):
        model(images, sizes, targets, noise=_noise(1), record=record)
    assert record["targets"][0]["boxes"].tolist() == [[0.0, 5.0, 30.0, 64.0]]


def test_more_gt_than_proposals():
    model = _train_model()
    images, sizes, targets = batch([(64, 64)], instances=20)  # N = 16 proposals
    record: dict = {}
    losses = model(images, sizes, targets, noise=_noise(1), record=record)
    assert record["corrupted"][0].x_start.shape == (16, 4)
    assert all(torch.isfinite(v) for v in losses.values())


def test_repeat_padding_trains_on_copies_of_the_gt_only():
    torch.manual_seed(0)
    cfg = tiny_config()
    cfg = dataclasses.replace(cfg, diffusion=dataclasses.replace(cfg.diffusion, gt_padding="repeat"))
    model = build_model(cfg).train()
    images, sizes, targets = batch([(64, 96), (80, 70)], instances=3)  # N = 16 proposals: 6, 5, 5 copies
    record: dict = {}
    losses = model(images, sizes, targets, noise=_noise(2), record=record)
    for corrupted, prepared in zip(record["corrupted"], record["targets"]):
        gt_signal = (prepared["boxes_cxcywh_norm"] * 2 - 1) * 2
        copies = (corrupted.x_start[:, None, :] == gt_signal[None]).all(-1)  # [N, G]
        assert copies.sum(1).tolist() == [1] * 16  # every slot is a GT box
        assert sorted(copies.sum(0).tolist()) == [5, 5, 6]
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


def test_federated_loss_needs_frequencies_and_masks_classes():
    images, sizes, targets = batch([(64, 64)])
    model = _train_model(use_fed_loss=True, fed_loss_num_classes=2)
    with pytest.raises(ValueError, match="class-frequency"):
        model(images, sizes, targets, noise=_noise(1))
    model.set_fed_loss_frequencies(torch.tensor([5.0, 1.0, 0.0, 2.0, 9.0]))
    fed = model(images, sizes, targets, noise=_noise(1))["loss_ce"]
    full = _train_model()(images, sizes, targets, noise=_noise(1))["loss_ce"]
    assert 0 < fed.item() < full.item()  # only the present + sampled classes contribute


@pytest.mark.parametrize(
    "images, sizes, message",
    [
        (torch.zeros(1, 3, 32, 32, dtype=torch.int32), torch.tensor([[32, 32]]), "uint8 or floating"),
        (torch.zeros(3, 32, 32, dtype=torch.uint8), torch.tensor([[32, 32]]), r"\[B, 3, H, W\]"),
        (torch.zeros(1, 4, 32, 32, dtype=torch.uint8), torch.tensor([[32, 32]]), "3 \\(RGB\\) channels"),
        (torch.zeros(1, 3, 0, 32, dtype=torch.uint8), torch.tensor([[0, 32]]), "zero height or width"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), torch.tensor([[0, 32]]), "image 0 is empty"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), torch.tensor([[40, 32]]), "exceeds the padded"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), torch.tensor([32, 32]), r"image_sizes must be"),
    ],
)
def test_bad_images_are_rejected(images, sizes, message):
    model = tiny_model()
    with pytest.raises((ValueError, TypeError), match=message):
        model.predict(images, sizes)


def test_bad_targets_are_rejected():
    model = _train_model()
    images, sizes, targets = batch([(64, 64)])
    bad = [{**targets[0], "labels": torch.tensor([0, 7])}]
    with pytest.raises(ValueError, match=r"must be in \[0, 5\)"):
        model(images, sizes, bad)
    bad = [{**targets[0], "masks": torch.zeros(2, 10, 10)}]
    with pytest.raises(ValueError, match="smaller than the image"):
        model(images, sizes, bad)
    with pytest.raises(KeyError, match="no 'masks'"):
        model(images, sizes, [{"boxes": targets[0]["boxes"], "labels": targets[0]["labels"]}])
    with pytest.raises(ValueError, match="needs targets"):
        model(images, sizes)


def test_from_scratch_bn_model_learns():
    """The demo's setting (freeze_at 0, BatchNorm) trains: loss falls when fitting one batch."""
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(tiny_config(), head=dataclasses.replace(tiny_config().head, num_stages=1)))
    model.train()
    assert all(p.requires_grad for p in model.backbone.parameters())
    images, sizes, targets = batch([(64, 64), (64, 64)], seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    bn = model.backbone.stem.conv1.norm
    mean_before = bn.running_mean.clone()
    history = []
    for _ in range(12):
        losses = model(images, sizes, targets, noise=_noise(2, seed=100))  # same corruption every step
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert not torch.equal(bn.running_mean, mean_before) and bn.weight.grad is not None
    assert history[-1] < 0.7 * history[0], history
    model.eval()
    assert len(model.predict(images, sizes, sampler_cfg=SamplerConfig(seed=0))) == 2
