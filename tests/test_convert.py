"""Official checkpoint conversion and loading: names, file formats, safety, error reports."""

from __future__ import annotations

import os
import pickle
import re

import pytest
import torch
import yaml
from model_helpers import (
    single_thread,  # noqa: F401 (autouse fixture)
    tiny_config,
)

from diffusioninst.convert import CheckpointError, convert_official_state_dict, load_checkpoint, main
from diffusioninst.model import build_model
from diffusioninst.model.official_config import from_official_config
from diffusioninst.model.state_io import UnsafePickleError

_STAGE = {"dynamic_conv.": "inst_interact.", "time_proj.": "block_time_mlp.", "cls_branch.": "cls_module.",
          "reg_branch.": "reg_module.", "bbox_delta.": "bboxes_delta."}  # fmt: skip


def official_names(model) -> dict[str, torch.Tensor]:
    """Our state dict written with the official (detectron2) names, as the official model would save it."""
    towers = len(model.mask_branch.tower)
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("backbone."):
            key = "backbone.bottom_up." + key[len("backbone.") :]
        elif m := re.match(r"fpn\.(lateral|output)_convs\.(\d)\.(.*)", key):
            key = f"backbone.fpn_{m[1]}{int(m[2]) + 2}.{m[3]}"
        elif m := re.match(r"head\.stages\.(\d+)\.(.*)", key):
            rest = m[2]
            for ours, theirs in _STAGE.items():
                rest = rest.replace(ours, theirs) if rest.startswith(ours) else rest
            key = f"head.head_series.{m[1]}.{rest}"
        elif m := re.match(r"mask_branch\.(refine|tower)\.(\d+)\.(conv|norm)\.(.*)", key):
            kind = "mask_refine" if m[1] == "refine" else "mask_head"
            key = f"head.{kind}.{m[2]}.{0 if m[3] == 'conv' else 1}.{m[4]}"
        elif key.startswith("mask_branch.out_conv."):
            key = f"head.mask_head.{towers}." + key.rsplit(".", 1)[1]
        out[key] = value.clone()
    sched = model.schedule
    out["betas"] = sched.betas.clone()
    out["alphas_cumprod"] = sched.alphas_cumprod.clone()
    out["sqrt_recip_alphas_cumprod"] = sched.sqrt_recip_alphas_cumprod.clone()
    return out


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(1)
    src = build_model(tiny_config())
    torch.manual_seed(2)
    dst = build_model(tiny_config())
    return src, dst


def _assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_round_trip_pth_and_cli(models, tmp_path):
    src, dst = models
    official = official_names(src)
    torch.save(official, tmp_path / "official.pth")
    report = load_checkpoint(dst, tmp_path / "official.pth")
    assert not report["unmatched"] and len(report["schedule"]) == 3
    _assert_same(src, dst)
    # CLI: official -> ours, then ours loads (auto-detected) without conversion
    assert main([str(tmp_path / "official.pth"), str(tmp_path / "ours.pth")]) == 0
    torch.manual_seed(3)
    fresh = build_model(tiny_config())
    assert load_checkpoint(fresh, tmp_path / "ours.pth") == {"converted": [], "schedule": [], "unmatched": []}
    _assert_same(src, fresh)


def test_pkl_with_numpy_arrays_and_metadata(models, tmp_path):
    src, dst = models
    blob = {
        "model": {k: v.numpy() for k, v in official_names(src).items()},
        "__author__": "Detectron2 Model Zoo",
        "matching_heuristics": True,
    }
    (tmp_path / "official.pkl").write_bytes(pickle.dumps(blob, protocol=2))
    load_checkpoint(dst, tmp_path / "official.pkl")
    _assert_same(src, dst)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned_marker",))


def test_malicious_pickles_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"model": {"x": _Exploit()}}))
    with pytest.raises(UnsafePickleError, match="refusing to unpickle global"):
        load_checkpoint(build_model(tiny_config()), tmp_path / "evil.pkl")
    torch.save({"x": _Exploit()}, tmp_path / "evil.pth")
    with pytest.raises(UnsafePickleError, match="weights_only"):
        load_checkpoint(build_model(tiny_config()), tmp_path / "evil.pth")
    assert not (tmp_path / "pwned_marker").exists()


def test_missing_unexpected_and_misshaped_keys_are_reported(models, tmp_path):
    src, dst = models
    official = official_names(src)
    del official["head.head_series.1.class_logits.bias"]
    official["head.head_series.0.extra.weight"] = torch.zeros(2)
    official["backbone.fpn_output2.bias"] = torch.zeros(7)
    torch.save(official, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(dst, tmp_path / "bad.pth")
    text = str(info.value)
    assert "missing (1): head.stages.1.class_logits.bias" in text
    assert "unexpected (1): head.stages.0.extra.weight" in text
    assert "fpn.output_convs.0.bias: checkpoint [7] vs model [32]" in text
    load_checkpoint(dst, tmp_path / "bad.pth", strict=False)  # loads every key that fits
    assert torch.equal(
        dst.state_dict()["head.stages.0.class_logits.weight"], src.state_dict()["head.stages.0.class_logits.weight"]
    )


def test_schedule_mismatch_and_missing_file(models, tmp_path):
    src, dst = models
    official = official_names(src)
    official["betas"] = official["betas"] * 1.01
    torch.save(official, tmp_path / "sched.pth")
    with pytest.raises(CheckpointError, match="diffusion schedule"):
        load_checkpoint(dst, tmp_path / "sched.pth")
    with pytest.raises(FileNotFoundError, match=r"model\.weights.*missing\.pth"):
        load_checkpoint(dst, tmp_path / "missing.pth")


def test_unmatched_official_keys_are_reported():
    ours, report = convert_official_state_dict(
        {"head.head_series.0.norm1.weight": torch.ones(2), "pixel_mean": torch.ones(3)}
    )
    assert list(ours) == ["head.stages.0.norm1.weight"] and report["unmatched"] == ["pixel_mean"]


def test_cli_checks_against_an_official_config(models, tmp_path):
    src, _ = models
    torch.save(official_names(src), tmp_path / "official.pth")
    cfg = tiny_config()
    d2 = {
        "MODEL": {
            "RESNETS": {"DEPTH": 18, "NORM": "BN", "RES2_OUT_CHANNELS": 64},
            "BACKBONE": {"FREEZE_AT": 0},
            "FPN": {"OUT_CHANNELS": 32},
            "DiffusionInst": {
                "NUM_CLASSES": 5, "NUM_PROPOSALS": 16, "HIDDEN_DIM": 32, "NHEADS": 4, "DIM_FEEDFORWARD": 64,
                "DIM_DYNAMIC": 8, "NUM_HEADS": 2, "SAMPLE_STEP": 4,
            },
        }
    }  # fmt: skip
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(d2))
    model_cfg, sampler_cfg = from_official_config(tmp_path / "config.yaml")
    assert model_cfg.head == cfg.head and sampler_cfg.steps == 4 and model_cfg.backbone.norm == "bn"
    # the official mask branch is 128 wide with 4 convs: our tiny 16/1 model does not fit it
    assert (
        main(
            [
                str(tmp_path / "official.pth"),
                str(tmp_path / "o.pth"),
                "--official-config",
                str(tmp_path / "config.yaml"),
            ]
        )
        == 1
    )
