"""Where a checkpoint's AP is lost: class-aware, class-agnostic and oracle-class box / mask AP.

Predicts the validation split of the checkpoint's config (or ``--config``) at ``--steps`` sampling steps and
scores the same detections three ways (:mod:`diffusioninst.evaluation.diagnostics`, pycocotools COCOeval):
the standard AP, the AP with classes ignored, and the AP after relabelling every detection with the class of
the GT box it overlaps most. COCO-format data only.

Usage::

    python benchmarks/class_errors.py --checkpoint runs/demo/checkpoint_0000449 [--steps 1] [--set KEY=VALUE ...]

Writes ``<output>.json`` and ``<output>.md`` (default ``benchmarks/results/class_errors``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusioninst.config import ExperimentConfig, load_config
from diffusioninst.engine.predictor import find_config, load_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint folder (ours) or converted weights")
    parser.add_argument("--config", default=None, help="experiment config (default: the checkpoint's own)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--steps", type=int, default=1, help="sampling steps (default 1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "class_errors"))
    args = parser.parse_args(argv)

    from pycocotools.coco import COCO

    from diffusioninst.data import build_eval_dataset
    from diffusioninst.engine.evaluate import predict_split
    from diffusioninst.evaluation.diagnostics import class_error_breakdown

    config = args.config or find_config(args.checkpoint)
    if config is None:
        parser.error(f"{args.checkpoint}: no config.yaml next to the checkpoint; pass --config")
    cfg = load_config(ExperimentConfig, config, args.set)
    torch.set_num_threads(args.threads)
    model = load_model(cfg, args.checkpoint)
    data = build_eval_dataset(cfg, split="val")
    if data.kind != "coco":
        parser.error(f"{config}: class-agnostic AP is defined here for COCO data only (this split is {data.kind})")
    sampler = dataclasses.replace(cfg.sampler, steps=args.steps)
    indices = list(range(len(data.dataset)))
    results = predict_split(
        model,
        cfg,
        data.dataset,
        indices,
        {args.steps: sampler},
        torch.device("cpu"),
        data.category_ids,
        progress_every=5,
    )[args.steps]
    gt = COCO(data.gt_json)
    breakdown = class_error_breakdown(gt, results, image_ids=data.image_ids)
    scores = sorted(r["score"] for r in results)
    report = {
        "checkpoint": str(args.checkpoint),
        "steps": args.steps,
        "num_images": len(indices),
        "num_detections": len(results),
        "max_score": scores[-1] if scores else None,
        "median_score": scores[len(scores) // 2] if scores else None,
        "ap": breakdown,
    }
    lines = [
        f"Class errors of `{args.checkpoint}` ({args.steps} step(s), {len(indices)} validation images; max "
        f"detection score {report['max_score']:.3f})"
        if scores
        else f"`{args.checkpoint}`: no detections",
        "",
        "| task | scoring | AP | AP50 | AP75 |",
        "|---|---|---|---|---|",
    ]
    for task, rows in breakdown.items():
        for name, stats in rows.items():
            lines.append(f"| {task} | {name} | {stats['AP']:.1f} | {stats['AP50']:.1f} | {stats['AP75']:.1f} |")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
