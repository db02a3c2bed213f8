"""Engine behaviour in-process (no Ray): evaluation vs pycocotools, non-finite loss, pipelines' error handling."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusioninst.config import ExperimentConfig, load_config, save_config

ROOT = Path(__file__).resolve().parents[1]


def tiny_cfg(tmp: Path, *extra: str) -> ExperimentConfig:
    return load_config(
        ExperimentConfig,
        ROOT / "experiments" / "demo.yaml",
        [
            f"data.synthetic.root={tmp / 'synthetic'}",
            "data.synthetic.num_train=8",
            "data.synthetic.num_val=6",
            "data.synthetic.image_size=[160,160]",
            "data.synthetic.max_object_size=100",
            "data.augmentation.min_size_train=[160]",
            "data.augmentation.max_size_train=267",
            "data.augmentation.min_size_test=160",
            "data.augmentation.max_size_test=267",
            "model.head.num_proposals=100",
            f"output_dir={tmp / 'out'}",
            f"ray.storage_path={tmp / 'runs'}",
            f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
            "ray.num_workers=0",
            *extra,
        ],
    )


def boxes_equal_proposals(model: torch.nn.Module) -> torch.nn.Module:
    """Zero the box-delta layers: predicted boxes are the sampled proposals (random, plausibly sized), so a
    random-weight model gets non-zero box AP and the AP comparison below is not a comparison of zeros."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bbox_delta" in name:
                p.zero_()
    return model


def pycocotools_stats(gt_json: str, results: list[dict], task: str) -> np.ndarray:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO(gt_json)
    dets = [dict(r) for r in results]
    if task == "segm":  # detectron2 protocol: segm areas come from the masks, not the boxes
        for d in dets:
            d.pop("bbox", None)
    dt = gt.loadRes(dets)
    ev = COCOeval(gt, dt, task)
    ev.params.imgIds = sorted(gt.getImgIds())
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return np.asarray(ev.stats) * 100


def test_evaluation_matches_pycocotools_run_directly(tmp_path):
    from diffusioninst.data import build_eval_dataset, ensure_dataset
    from diffusioninst.engine.evaluate import evaluate_model
    from diffusioninst.evaluation import COCO_AP_COLUMNS
    from diffusioninst.model import build_model

    cfg = ensure_dataset(tiny_cfg(tmp_path, "eval.save_predictions=true", "eval.steps=[1,2]"))
    torch.manual_seed(0)
    model = boxes_equal_proposals(build_model(cfg.model))
    out = evaluate_model(model, cfg, steps=[1, 2], out_dir=tmp_path / "eval")
    gt_json = build_eval_dataset(cfg).gt_json
    nonzero = 0
    for steps in (1, 2):
        preds = json.loads((tmp_path / "eval" / f"predictions_steps_{steps}.json").read_text())
        assert preds and {"image_id", "category_id", "bbox", "score", "segmentation"} <= set(preds[0])
        for task in ("bbox", "segm"):
            ref = pycocotools_stats(gt_json, preds, task)
            ours = np.array([out.results[steps].stats[task][c] for c in COCO_AP_COLUMNS], dtype=float)
            ref_ap = np.where(ref[:6] < 0, np.nan, ref[:6])  # pycocotools prints -1 where there is no GT
            np.testing.assert_allclose(ours, ref_ap, rtol=0, atol=1e-9, equal_nan=True)
            assert out.flat_metrics[f"eval/steps_{steps}/{task}/AP"] == pytest.approx(ref[0], abs=1e-9)
            nonzero += int(np.nansum(ours) > 0)
    assert nonzero >= 2, "degenerate comparison: every AP is zero"
    assert (tmp_path / "eval" / "ap_table.md").is_file()


def test_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from diffusioninst.engine.launch import train
    from diffusioninst.engine.train import NonFiniteLossError
    from diffusioninst.model import DiffusionInst

    original = DiffusionInst.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        losses = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            losses["loss_giou_0"] = losses["loss_giou_0"] * float("nan")
        return losses

    monkeypatch.setattr(DiffusionInst, "forward", poisoned)
    cfg = tiny_cfg(
        tmp_path,
        "name=nan",
        "solver.max_iter=6",
        "solver.steps=[5]",
        "solver.warmup_iters=1",
        "solver.checkpoint_period=2",
        "solver.log_period=1",
        "solver.ims_per_batch=2",
        "model.head.num_proposals=20",
    )
    with pytest.raises(NonFiniteLossError) as info:
        train(cfg)
    message = str(info.value)
    assert "non-finite loss at iteration 3" in message
    assert "loss_giou_0=nan" in message and "loss_ce=" in message
    assert "last good checkpoint: iteration 2" in message
    run_dir = tmp_path / "runs" / "nan"
    assert (run_dir / "checkpoint_0000002" / "state.pt").is_file()
    assert not (run_dir / "checkpoint_0000004").exists()
    status = json.loads((run_dir / "checkpoint_0000002_nonfinite_loss" / "status.json").read_text())
    assert status["iteration"] == 3 and status["last_good_iteration"] == 2
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("diffusioninst-demo").experiment_id])[0]
    assert run.data.tags["diffusioninst.status"] == "nonfinite_loss"
    assert run.info.status == "FAILED"


def test_time_budget_ends_the_run_and_decays_the_lr_on_time(tmp_path):
    from diffusioninst.engine.checkpoint import read_state
    from diffusioninst.engine.launch import train

    cfg = tiny_cfg(
        tmp_path,
        "name=budget",
        "solver.max_iter=100000",
        "solver.steps=[50000]",
        "solver.warmup_iters=0",
        "solver.time_budget_min=0.05",  # 3 s of training
        "solver.log_period=1",
        "solver.ims_per_batch=1",
        "model.head.num_proposals=10",
        "eval.at_end=false",
        "tracking.enabled=false",
    )
    outcome = train(cfg)
    state = read_state(Path(outcome.checkpoint_path), map_location="cpu")
    stopped = int(state["iteration"])
    assert 1 <= stopped < 100000 and state["train_seconds"] >= 3.0
    lrs = [h["lr"] for h in state["history"]]
    assert lrs[0] == pytest.approx(cfg.solver.base_lr)
    assert lrs[-1] == pytest.approx(cfg.solver.base_lr * cfg.solver.gamma)  # decayed at half the budget
    again = train(cfg)  # the budget is spent: re-running resumes and stops at once
    assert int(read_state(Path(again.checkpoint_path), map_location="cpu")["iteration"]) == stopped


def _pipeline(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "pipelines" / script), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
    )


def test_missing_dataset_path_is_a_clear_error(tmp_path):
    out = _pipeline(
        "train.py",
        "--set",
        "data.format=coco",
        f"data.train.images={tmp_path / 'nope'}",
        f"data.train.annotations={tmp_path / 'nope.json'}",
        f"data.val.images={tmp_path / 'nope'}",
        f"data.val.annotations={tmp_path / 'nope.json'}",
        "tracking.enabled=false",
    )
    assert out.returncode == 1, out.stderr[-3000:]
    assert "nope.json" in out.stderr and "Traceback" not in out.stderr


def test_unreachable_tracking_server_is_a_clear_error(tmp_path):
    out = _pipeline(
        "train.py",
        "--set",
        "tracking.tracking_uri=http://127.0.0.1:9",
        f"data.synthetic.root={tmp_path / 'syn'}",
    )
    assert out.returncode == 1, out.stderr[-3000:]
    assert "unreachable" in out.stderr and "Traceback" not in out.stderr


def test_rerun_with_another_model_is_a_clear_error_before_ray_starts(tmp_path):
    """A re-run resumes the latest checkpoint under storage/name: a changed model is named, not a state-dict error."""
    from diffusioninst.engine.launch import check_resume_compatible

    cfg = load_config(ExperimentConfig, ROOT / "experiments" / "demo.yaml", [f"ray.storage_path={tmp_path / 'runs'}"])
    check_resume_compatible(cfg)  # nothing to resume
    for it, proposals in ((200, 100), (400, 64)):  # the latest checkpoint decides
        ckpt = tmp_path / "runs" / "demo" / f"checkpoint_{it:07d}"
        ckpt.mkdir(parents=True)
        old = load_config(
            ExperimentConfig, ROOT / "experiments" / "demo.yaml", [f"model.head.num_proposals={proposals}"]
        )
        save_config(old, ckpt / "config.yaml")
    same = load_config(
        ExperimentConfig,
        ROOT / "experiments" / "demo.yaml",
        [f"ray.storage_path={tmp_path / 'runs'}", "model.head.num_proposals=64", "solver.base_lr=0.002"],
    )
    check_resume_compatible(same)  # only the model has to match
    out = _pipeline("train.py", "--set", f"ray.storage_path={tmp_path / 'runs'}", "tracking.enabled=false")
    assert out.returncode == 1, out.stderr[-3000:]
    assert "model.head.num_proposals: 64 there, 100 now" in out.stderr and "checkpoint_0000400" in out.stderr
    assert "Traceback" not in out.stderr


def _weights_checkpoint(tmp_path: Path) -> tuple[Path, ExperimentConfig]:
    from diffusioninst.model import build_model

    cfg = tiny_cfg(tmp_path)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.manual_seed(0)
    torch.save({"model": boxes_equal_proposals(build_model(cfg.model)).state_dict()}, ckpt / "model_final.pt")
    save_config(cfg, ckpt / "config.yaml")
    return ckpt, cfg


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    ckpt, _ = _weights_checkpoint(tmp_path)
    bad = ckpt / "model_final.pt"
    bad.write_bytes(bad.read_bytes()[:1000])
    out = _pipeline("evaluate.py", "--checkpoint", str(bad), "--set", "tracking.enabled=false")
    assert out.returncode == 1, out.stderr[-3000:]
    assert "model_final.pt" in out.stderr and "Traceback" not in out.stderr


def test_predict_writes_overlays_and_coco_results(tmp_path):
    ckpt, cfg = _weights_checkpoint(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate([(120, 160), (160, 100)]):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(images / f"img{i}.jpg")
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    out_dir = tmp_path / "pred"
    out = _pipeline(
        "predict.py",
        "--checkpoint",
        str(ckpt / "model_final.pt"),
        "--input",
        str(images),
        "--output",
        str(out_dir),
        "--batch-size",
        "2",
        "--min-score",
        "0",
    )
    assert out.returncode == 1, out.stderr[-3000:]  # one unreadable image is reported, not silently dropped
    assert "broken.jpg" in out.stderr
    for i, size in enumerate([(120, 160), (160, 100)]):
        with Image.open(out_dir / f"img{i}.png") as im:
            assert im.size == (size[1], size[0])
    records = json.loads((out_dir / "predictions.json").read_text())
    assert {r["file_name"] for r in records} == {"img0.jpg", "img1.jpg"}
    from pycocotools import mask as mask_utils

    for r in records[:20]:
        h, w = r["segmentation"]["size"]
        assert (h, w) in {(120, 160), (160, 100)}
        assert mask_utils.decode({"size": [h, w], "counts": r["segmentation"]["counts"].encode()}).shape == (h, w)
        assert 0 <= r["category_id"] < cfg.model.head.num_classes


def test_ema_weights_are_checkpointed_resumed_and_evaluated(tmp_path):
    from diffusioninst.engine.checkpoint import read_state
    from diffusioninst.engine.launch import train
    from diffusioninst.engine.predictor import load_model

    common = [
        "name=ema",
        "solver.ema_decay=0.9",
        "solver.steps=[3]",
        "solver.warmup_iters=0",
        "solver.checkpoint_period=100",
        "solver.ims_per_batch=1",
        "model.head.num_proposals=10",
        "eval.at_end=false",
        "tracking.enabled=false",
    ]
    first = read_state(Path(train(tiny_cfg(tmp_path, *common, "solver.max_iter=3")).checkpoint_path))
    assert first["ema_updates"] == 3
    cfg = tiny_cfg(tmp_path, *common, "solver.max_iter=4")
    outcome = train(cfg)  # resumes at iteration 3 and takes one more step
    second = read_state(Path(outcome.checkpoint_path))
    assert second["iteration"] == 4 and second["ema_updates"] == 4
    d = 4 / 13  # the 4th update: min(0.9, (1 + 3) / (10 + 3))
    for key, value in second["model_ema"].items():
        if value.is_floating_point():
            expected = d * first["model_ema"][key] + (1 - d) * second["model"][key]
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=key)
    changed = [k for k, v in second["model"].items() if v.is_floating_point() and not torch.equal(v, first["model"][k])]
    assert changed  # the step moved the weights, so the average differs from them
    loaded = load_model(cfg, outcome.checkpoint_path).state_dict()  # evaluation / predict load the average
    assert all(torch.equal(loaded[k], second["model_ema"][k].to(loaded[k].dtype)) for k in changed)
    assert not all(torch.equal(loaded[k], second["model"][k]) for k in changed)
