"""Backbones: detectron2 semantics, weight files in every supported naming, Swin input sizes, FPN."""

from __future__ import annotations

import pickle

import pytest
import torch
import torchvision
from model_helpers import single_thread  # noqa: F401 (autouse fixture)

from diffusioninst.config.schema import BackboneConfig, ModelConfig
from diffusioninst.model.backbone import FPN, FrozenBatchNorm2d, ResNet, SwinBackbone, build_backbone
from diffusioninst.model.backbone.pooling import stem_max_pool
from diffusioninst.model.backbone.weights import load_backbone_weights

TINY_SWIN = {"embed_dim": 16, "depths": (1, 1, 2, 1), "num_heads": (1, 2, 2, 4)}


def _randomize_bn(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


@pytest.mark.parametrize("depth", [18, 50])
def test_torchvision_weights_reproduce_torchvision(tmp_path, depth):
    tv = getattr(torchvision.models, f"resnet{depth}")().eval()  # random init: nothing is downloaded
    _randomize_bn(tv)
    path = tmp_path / f"r{depth}.pth"
    torch.save(tv.state_dict(), path)
    ours = ResNet(depth=depth, res2_out_channels=64 if depth == 18 else 256, freeze_at=0).eval()
    report = load_backbone_weights(ours, path)
    assert report.naming == "torchvision"
    assert [k for k in report.ignored if not k.endswith("num_batches_tracked")] == ["fc.bias", "fc.weight"]
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        feats = ours(x)
        y = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        for i, layer in enumerate([tv.layer1, tv.layer2, tv.layer3, tv.layer4], start=2):
            y = layer(y)
            assert torch.allclose(feats[f"res{i}"], y, atol=1e-5), f"res{i}"


def test_a_pyramid_without_res5_builds_no_res5(tmp_path):
    """fpn.in_features up to res4: the ResNet stops there; torchvision weights load, their layer4 is ignored."""
    from diffusioninst.config.schema import FPNConfig

    cfg = ModelConfig(
        backbone=BackboneConfig(name="resnet18", freeze_at=0), fpn=FPNConfig(in_features=["res2", "res3", "res4"])
    )
    net = build_backbone(cfg).eval()
    assert net.last_stage == 4 and not hasattr(net, "res5") and list(net.strides) == ["res2", "res3", "res4"]
    assert not any(k.startswith("res5.") for k in net.state_dict())
    tv = torchvision.models.resnet18().eval()
    _randomize_bn(tv)
    torch.save(tv.state_dict(), tmp_path / "r18.pth")
    report = load_backbone_weights(net, tmp_path / "r18.pth")
    ignored = [k for k in report.ignored if not k.endswith("num_batches_tracked")]
    assert any(k.startswith("layer4.") for k in ignored) and not any(k.startswith("layer3.") for k in ignored)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        feats = net(x)
        y = tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x)))))))
    assert list(feats) == ["res2", "res3", "res4"] and torch.allclose(feats["res4"], y, atol=1e-5)
    with pytest.raises(ValueError, match="last_stage"):
        ResNet(depth=18, last_stage=6)


def test_detectron2_pkl_and_caffe2_names(tmp_path):
    src = ResNet(depth=50, stem_out_channels=16, res2_out_channels=32, width_per_group=8, freeze_at=0)
    state = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    d2 = {"model": {f"backbone.bottom_up.{k}": v.numpy() for k, v in state.items()}, "__author__": "test"}
    (tmp_path / "d2.pkl").write_bytes(pickle.dumps(d2))
    c2 = {}
    for k, v in state.items():
        k = k.replace("stem.conv1.norm.", "res_conv1_bn_").replace("stem.conv1.weight", "conv1_w")
        for ours, theirs in (
            ("conv1", "branch2a"),
            ("conv2", "branch2b"),
            ("conv3", "branch2c"),
            ("shortcut", "branch1"),
        ):
            k = k.replace(f".{ours}.norm.", f"_{theirs}_bn_").replace(f".{ours}.weight", f"_{theirs}_w")
        k = k.replace("weight", "s").replace("bias", "b").replace("running_mean", "rm").replace("running_var", "riv")
        c2[k.replace(".", "_")] = v.numpy()
    (tmp_path / "c2.pkl").write_bytes(pickle.dumps(c2, protocol=2))
    for name, naming in (("d2.pkl", "detectron2"), ("c2.pkl", "caffe2")):
        dst = ResNet(depth=50, stem_out_channels=16, res2_out_channels=32, width_per_group=8, freeze_at=0)
        report = load_backbone_weights(dst, tmp_path / name)
        assert report.naming == naming
        for k, v in state.items():
            assert torch.equal(dst.state_dict()[k], v), (name, k)


def test_missing_file_and_wrong_shapes_give_clear_errors(tmp_path):
    cfg = ModelConfig(backbone=BackboneConfig(name="resnet18", weights=str(tmp_path / "nope.pth")))
    with pytest.raises(FileNotFoundError, match=r"model\.backbone\.weights.*nope\.pth"):
        build_backbone(cfg)
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth")
    with pytest.raises(ValueError, match="missing"):
        load_backbone_weights(ResNet(depth=50, freeze_at=0), tmp_path / "r34.pth")  # basic vs bottleneck blocks


def test_freeze_at_and_norm_options():
    net = ResNet(depth=18, res2_out_channels=64, norm="bn", freeze_at=2)
    assert all(not p.requires_grad for p in net.stem.parameters()) and all(
        not p.requires_grad for p in net.res2.parameters()
    )
    assert isinstance(net.stem.conv1.norm, FrozenBatchNorm2d) and isinstance(net.res2[0].conv1.norm, FrozenBatchNorm2d)
    assert all(p.requires_grad for p in net.res3.parameters())
    assert isinstance(net.res3[0].conv1.norm, torch.nn.BatchNorm2d)
    for norm in ("gn", "bn", "frozen_bn"):
        net = ResNet(depth=18, res2_out_channels=64, norm=norm, freeze_at=0).train()
        out = net(torch.randn(2, 3, 64, 64))
        out["res5"].sum().backward()
        assert out["res5"].shape == (2, 512, 2, 2)
    assert isinstance(ResNet(depth=18, res2_out_channels=64, norm="sync_bn").res3[0].conv1.norm, torch.nn.SyncBatchNorm)


def test_resnet_strides_and_stride_in_1x1():
    net = ResNet(depth=50, stem_out_channels=16, res2_out_channels=32, width_per_group=8, stride_in_1x1=True)
    assert net.res3[0].conv1.stride == (2, 2) and net.res3[0].conv2.stride == (1, 1)
    feats = net(torch.randn(1, 3, 64, 96))
    assert [tuple(feats[k].shape[-2:]) for k in ("res2", "res3", "res4", "res5")] == [(16, 24), (8, 12), (4, 6), (2, 3)]


def test_swin_accepts_non_square_multiples_of_32_and_timm_weights(tmp_path):
    swin = SwinBackbone("swin_tiny_patch4_window7_224", **TINY_SWIN).eval()
    x = torch.randn(1, 3, 96, 160)  # multiples of 32, not of the window (7 patches)
    with torch.no_grad():
        feats = swin(x)
    assert [tuple(f.shape) for f in feats.values()] == [
        (1, 16, 24, 40),
        (1, 32, 12, 20),
        (1, 64, 6, 10),
        (1, 128, 3, 5),
    ]
    with pytest.raises(ValueError, match="multiples of 32"):
        swin(torch.randn(1, 3, 100, 160))
    # timm names (body.*) and Microsoft names (downsample at the end of a stage, norm{i} output norms)
    timm_state = {k.removeprefix("body."): v for k, v in swin.state_dict().items() if k.startswith("body.")}
    torch.save(timm_state, tmp_path / "timm.pth")
    ms = {}
    for k, v in timm_state.items():
        if ".downsample." in k:
            stage = int(k.split(".")[1])
            k = k.replace(f"layers.{stage}.downsample", f"layers.{stage - 1}.downsample")
        ms[k] = v
    ms.update({f"norm{i}.weight": torch.full((16 * 2**i,), 2.0) for i in range(4)})
    ms.update({f"norm{i}.bias": torch.zeros(16 * 2**i) for i in range(4)})
    torch.save({"model": ms}, tmp_path / "ms.pth")
    for name, naming in (("timm.pth", "timm"), ("ms.pth", "microsoft")):
        other = SwinBackbone("swin_tiny_patch4_window7_224", **TINY_SWIN).eval()
        report = load_backbone_weights(other, tmp_path / name)
        assert report.naming == naming
        with torch.no_grad():
            out = other(x)
        if naming == "timm":
            assert all(torch.equal(out[k], feats[k]) for k in feats)
        else:
            assert torch.equal(other.out_norms[0].weight, torch.full((16,), 2.0))
            assert torch.equal(
                other.body.layers[1].downsample.reduction.weight, swin.body.layers[1].downsample.reduction.weight
            )


def test_fpn_levels_and_strides():
    fpn = FPN([16, 32, 64, 128], [4, 8, 16, 32], 24)
    feats = [torch.randn(1, c, 64 // s, 96 // s) for c, s in zip([16, 32, 64, 128], [4, 8, 16, 32])]
    out = fpn(feats)
    assert list(out) == ["p2", "p3", "p4", "p5", "p6"] and out["p6"].shape == (1, 24, 1, 2)
    assert fpn.strides == {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
    assert torch.equal(out["p6"], out["p5"][:, :, ::2, ::2])  # max_pool2d(k=1, s=2)


@pytest.mark.parametrize(
    "shape", [(2, 3, 7, 9), (1, 2, 1, 1), (1, 2, 2, 3), (3, 4, 6, 5), (2, 8, 33, 18), (4, 32, 40, 40)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stem_max_pool_equals_torch_values_and_gradients_with_ties(shape, dtype):
    """Both fast paths against F.max_pool2d bit for bit: values on the no-grad path, values and gradients
    on the autograd path. Values are rounded to halves after a ReLU, so most windows hold tied maxima
    (zeros and positives): the gradient must go to the first maximum in row-major window order."""
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.relu(torch.randn(shape, generator=g, dtype=dtype)) * 2).round() / 2
    x[..., 0, 0] = -torch.inf  # a corner the padding must not beat
    if shape[-1] >= 3:
        x[..., -1, 1:3] = 9.0  # a positive maximum held twice in one window
    ref = torch.nn.functional.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    with torch.no_grad():
        assert torch.equal(stem_max_pool(x), ref)
    grad_out = torch.randn(ref.shape, generator=g, dtype=dtype)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = stem_max_pool(a)
    assert out.is_contiguous() and torch.equal(out, ref)
    out.backward(grad_out)
    torch.nn.functional.max_pool2d(b, kernel_size=3, stride=2, padding=1).backward(grad_out)
    assert torch.equal(a.grad, b.grad)
    if shape[-1] >= 3:  # the ties are real: some output's window holds its maximum more than once
        windows = torch.nn.functional.unfold(
            torch.nn.functional.pad(x.flatten(0, 1)[:, None], (1, 1, 1, 1), value=-torch.inf), 3, stride=2
        )
        assert ((windows == windows.max(1, keepdim=True).values).sum(1) > 1).any()


def test_stem_max_pool_falls_back_to_torch_for_other_inputs():
    x = torch.randn(2, 8, 9, 10)
    cl = x.contiguous(memory_format=torch.channels_last)  # not NCHW-contiguous: PyTorch's kernel, same layout out
    out = stem_max_pool(cl)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, torch.nn.functional.max_pool2d(x, 3, 2, 1))
    assert torch.equal(stem_max_pool(x[:, :, :, ::2]), torch.nn.functional.max_pool2d(x[:, :, :, ::2], 3, 2, 1))
    ints = torch.randint(0, 5, (1, 2, 5, 5))
    assert torch.equal(stem_max_pool(ints), torch.nn.functional.max_pool2d(ints, 3, 2, 1))
