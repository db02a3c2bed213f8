"""Config loading, inheritance, overrides and validation errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from diffusioninst.config import (
    ConfigError,
    ExperimentConfig,
    flatten,
    load_config,
    save_config,
    to_dict,
)

ROOT = Path(__file__).resolve().parents[1]
SYN = ["data.format=synthetic"]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def error_of(fn) -> str:
    with pytest.raises(ConfigError) as info:
        fn()
    return str(info.value)


def test_defaults_are_the_official_r50_recipe():
    cfg = load_config(ExperimentConfig, None, SYN)
    assert cfg.model.head.num_proposals == 500
    assert cfg.model.head.num_stages == 6
    assert cfg.model.diffusion.signal_scale == 2.0
    assert cfg.model.loss.mask_weight == 5.0
    assert cfg.sampler.eta == 1.0 and cfg.sampler.ensemble_last_step is False
    assert cfg.solver.base_lr == 5e-5 and cfg.solver.ims_per_batch == 32 and cfg.solver.max_iter == 90000


def test_base_inheritance_merges_mappings_and_replaces_lists(tmp_path):
    write(
        tmp_path / "base.yaml",
        "data: {format: synthetic}\neval: {steps: [1, 4]}\nmodel:\n  head: {num_proposals: 100}\n",
    )
    sub = tmp_path / "sub"
    sub.mkdir()
    write(sub / "child.yaml", "_base_: ../base.yaml\neval: {steps: [8]}\nmodel:\n  head: {num_stages: 3}\n")
    cfg = load_config(ExperimentConfig, sub / "child.yaml")
    assert cfg.model.head.num_proposals == 100  # from base
    assert cfg.model.head.num_stages == 3  # from child
    assert cfg.eval.steps == [8]  # lists are replaced, not concatenated


def test_multiple_bases_apply_in_order(tmp_path):
    write(tmp_path / "a.yaml", "data: {format: synthetic}\nmodel: {head: {num_proposals: 10, num_stages: 2}}\n")
    write(tmp_path / "b.yaml", "model: {head: {num_proposals: 20}}\n")
    write(tmp_path / "c.yaml", "_base_: [a.yaml, b.yaml]\n")
    cfg = load_config(ExperimentConfig, tmp_path / "c.yaml")
    assert (cfg.model.head.num_proposals, cfg.model.head.num_stages) == (20, 2)


def test_dotted_overrides_parse_yaml_values(tmp_path):
    cfg = load_config(
        ExperimentConfig,
        None,
        SYN + ["model.head.num_proposals=300", "eval.steps=[1,4]", "model.backbone.weights=null", "sampler.eta=0"],
    )
    assert cfg.model.head.num_proposals == 300
    assert cfg.eval.steps == [1, 4]
    assert cfg.model.backbone.weights is None
    assert cfg.sampler.eta == 0.0 and isinstance(cfg.sampler.eta, float)
    # YAML 1.1 reads 1e-3 (no dot) as a string; float fields accept it
    cfg = load_config(ExperimentConfig, None, SYN + ["solver.base_lr=1e-3", "solver.weight_decay=5E-5"])
    assert cfg.solver.base_lr == 1e-3 and cfg.solver.weight_decay == 5e-5
    msg = error_of(lambda: load_config(ExperimentConfig, None, SYN + ["solver.base_lr=fast"]))
    assert "solver.base_lr: expected float, got 'fast'" in msg


def test_unknown_key_names_file_and_suggests_nearest(tmp_path):
    f = write(tmp_path / "typo.yaml", "data: {format: synthetic}\nmodel:\n  head:\n    num_proposal: 300\n")
    msg = error_of(lambda: load_config(ExperimentConfig, f))
    assert str(f) in msg
    assert "unknown key 'model.head.num_proposal'" in msg
    assert "did you mean 'model.head.num_proposals'" in msg


def test_unknown_override_key_names_the_cli(tmp_path):
    msg = error_of(lambda: load_config(ExperimentConfig, None, SYN + ["solver.base_rl=0.1"]))
    assert "--set" in msg and "did you mean 'solver.base_lr'" in msg


def test_bad_type_names_key_and_expected_type(tmp_path):
    f = write(tmp_path / "t.yaml", "data: {format: synthetic}\nmodel: {head: {nheads: eight}}\n")
    msg = error_of(lambda: load_config(ExperimentConfig, f))
    assert f"{f}: model.head.nheads: expected int, got 'eight'" in msg
    msg = error_of(lambda: load_config(ExperimentConfig, None, SYN + ["sampler.box_renewal=3"]))
    assert "sampler.box_renewal: expected bool" in msg
    msg = error_of(lambda: load_config(ExperimentConfig, None, SYN + ["model.backbone.norm=batchnorm"]))
    assert "expected one of 'frozen_bn', 'bn', 'sync_bn', 'gn'" in msg


def test_bad_range_names_key_and_allowed_range(tmp_path):
    f = write(tmp_path / "r.yaml", "data: {format: synthetic}\nsampler: {eta: 1.5}\nmodel: {loss: {mask_weight: -1}}\n")
    msg = error_of(lambda: load_config(ExperimentConfig, f))
    assert "sampler.eta: 1.5 is out of range; allowed: >= 0.0 and <= 1.0" in msg
    assert "model.loss.mask_weight: -1.0 is out of range; allowed: >= 0.0" in msg  # every problem at once
    msg = error_of(lambda: load_config(ExperimentConfig, None, SYN + ["model.head.num_proposals=0"]))
    assert "model.head.num_proposals: 0 is out of range; allowed: >= 1" in msg


def test_cross_field_rules_name_both_keys():
    msg = error_of(lambda: load_config(ExperimentConfig, None, SYN + ["model.head.hidden_dim=128"]))
    assert "model.head.hidden_dim: must equal model.fpn.out_channels (256)" in msg
    msg = error_of(lambda: load_config(ExperimentConfig, None, SYN + ["solver.max_iter=10", "solver.steps=[5,20]"]))
    assert "solver.steps: every step must be <= solver.max_iter (10)" in msg
    msg = error_of(lambda: load_config(ExperimentConfig, None, ["data.format=coco"]))
    assert "data.train: format 'coco' needs train.images and train.annotations" in msg


def test_bad_base_path_names_the_including_file(tmp_path):
    f = write(tmp_path / "child.yaml", "_base_: missing/base.yaml\n")
    msg = error_of(lambda: load_config(ExperimentConfig, f))
    assert f"{f}: _base_ 'missing/base.yaml' not found" in msg


def test_base_cycle_is_reported(tmp_path):
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    assert "_base_ cycle" in error_of(lambda: load_config(ExperimentConfig, tmp_path / "a.yaml"))


def test_malformed_yaml_names_file_and_line(tmp_path):
    f = write(tmp_path / "bad.yaml", "model:\n  head:\n    num_proposals: [1, 2\nsolver: {}\n")
    msg = error_of(lambda: load_config(ExperimentConfig, f))
    assert str(f) in msg and "malformed YAML" in msg and "line " in msg


def test_non_mapping_yaml_is_rejected(tmp_path):
    f = write(tmp_path / "list.yaml", "- 1\n- 2\n")
    assert "top level must be a mapping" in error_of(lambda: load_config(ExperimentConfig, f))


def test_error_blames_the_file_that_set_the_value(tmp_path):
    write(tmp_path / "base.yaml", "data: {format: synthetic}\nsampler: {eta: 3}\n")
    child = write(tmp_path / "child.yaml", "_base_: base.yaml\nmodel: {head: {num_proposals: 10}}\n")
    msg = error_of(lambda: load_config(ExperimentConfig, child))
    assert f"{tmp_path / 'base.yaml'}: sampler.eta" in msg


def test_override_without_equals_is_rejected():
    assert "expected KEY=VALUE" in error_of(lambda: load_config(ExperimentConfig, None, ["model.head"]))


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(ExperimentConfig, None, SYN + ["model.head.num_proposals=42"])
    path = save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(ExperimentConfig, path)
    assert to_dict(again) == to_dict(cfg)
    flat = flatten(cfg)
    assert flat["model.head.num_proposals"] == 42
    assert all(not isinstance(v, dict) for v in flat.values())


def test_every_experiment_file_validates():
    files = sorted((ROOT / "experiments").glob("*.yaml"))
    assert files, "experiments/ has no configs"
    for f in files:
        tree = yaml.safe_load(f.read_text()) or {}
        if "search_space" in tree or "sweep" in tree:
            continue  # sweep files are validated by the tune tests
        load_config(ExperimentConfig, f)


def test_cli_help_and_config_errors_exit_cleanly(tmp_path):
    script = ROOT / "pipelines" / "train.py"
    out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0
    for flag in ("--config", "--set", "--print-config", "--list-keys"):
        assert flag in out.stdout
    bad = write(tmp_path / "bad.yaml", "solver: {base_lr: -1}\n")
    out = subprocess.run([sys.executable, str(script), "--config", str(bad)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2
    assert "solver.base_lr: -1.0 is out of range" in out.stderr
    out = subprocess.run(
        [sys.executable, str(script), "--print-config", "--set", "model.head.num_proposals=7"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout)["model"]["head"]["num_proposals"] == 7


def test_bf16_autocast_without_gpu_is_rejected_before_any_work():
    """torchvision's CPU RoIAlign has no bfloat16 kernel: forcing bf16 on CPU would fail at the first step."""
    msg = error_of(lambda: load_config(ExperimentConfig, None, SYN + ["solver.amp=bf16"]))
    assert "solver.amp" in msg and "ray.use_gpu" in msg
    cfg = load_config(ExperimentConfig, None, SYN + ["solver.amp=bf16", "ray.use_gpu=true"])
    assert cfg.solver.amp == "bf16"
