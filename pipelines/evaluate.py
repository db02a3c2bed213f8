"""Evaluate a checkpoint: COCO or LVIS box and mask AP for one or more sampling-step counts.

The image encoder runs once per image for all step counts. Writes ap_table.md/.csv/.json and per-category AP
to --output, prints the table, and logs everything to an MLflow run.

Examples:
  python pipelines/evaluate.py --checkpoint runs/demo/checkpoint_0001000 --steps 1 2 4 8
  python pipelines/evaluate.py --checkpoint official_r50.pth --config experiments/coco_r50.yaml --steps 1 4
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusioninst.config import ExperimentConfig
from diffusioninst.config.cli import make_parser, resolve


def build_parser():
    parser = make_parser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder, weights file, or official .pth/.pkl")
    parser.add_argument("--steps", type=int, nargs="+", help="sampling-step counts (default: eval.steps)")
    parser.add_argument("--max-images", type=int, help="evaluate only the first N validation images")
    parser.add_argument("--output", help="folder for the AP tables (default: <output_dir>/eval)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from diffusioninst.engine.predictor import find_config

    parser = build_parser()
    args, cfg = resolve(parser, ExperimentConfig, argv, config_from=lambda a: find_config(a.checkpoint))

    import torch

    from diffusioninst.data import DatasetError, ensure_dataset
    from diffusioninst.engine.checkpoint import CheckpointError
    from diffusioninst.engine.evaluate import evaluate_model
    from diffusioninst.engine.host import keep_freed_memory
    from diffusioninst.engine.launch import open_eval_tracking
    from diffusioninst.engine.predictor import load_model
    from diffusioninst.tracking import TrackingError

    keep_freed_memory(cfg.host.keep_freed_memory)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    out_dir = Path(args.output or Path(cfg.output_dir) / "eval").resolve()
    steps = args.steps or cfg.eval.steps
    try:
        cfg = ensure_dataset(cfg)
        model = load_model(cfg, args.checkpoint, device)
        run = open_eval_tracking(cfg, args.checkpoint, steps)
        outcome = evaluate_model(model, cfg, device=device, steps=steps, max_images=args.max_images, out_dir=out_dir)
    except (CheckpointError, DatasetError, TrackingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    run.log_metrics(outcome.flat_metrics)
    run.log_artifacts(out_dir, "eval")
    run.finish()
    print(outcome.table)
    print(f"{outcome.num_images} images in {outcome.seconds:.1f} s; tables in {out_dir}")
    if run.run_id:
        print(f"mlflow: run {run.run_id} in {run.tracking_uri}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
