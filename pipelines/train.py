"""Train DiffusionInst with Ray Train (DDP), evaluate it, and track everything in MLflow.

With no arguments it runs the embedded default (experiments/demo.yaml): it generates a small synthetic
dataset once (cached), starts a local Ray, trains, evaluates, logs to a local MLflow store and prints the AP
table and where everything was written. Re-running the same command resumes an interrupted run.

Examples:
  python pipelines/train.py
  python pipelines/train.py --config experiments/coco_r50.yaml --set ray.num_workers=8 --set ray.use_gpu=true
  ray job submit --working-dir . -- python pipelines/train.py --config experiments/coco_r50.yaml
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusioninst.config import ExperimentConfig
from diffusioninst.config.cli import make_parser, resolve


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__, default_config=str(ROOT / "experiments" / "demo.yaml"))
    _, cfg = resolve(parser, ExperimentConfig, argv)

    from diffusioninst.data import DatasetError
    from diffusioninst.engine.checkpoint import CheckpointError
    from diffusioninst.engine.launch import LaunchError, train
    from diffusioninst.engine.train import NonFiniteLossError
    from diffusioninst.tracking import TrackingError

    t0 = time.perf_counter()
    try:
        outcome = train(cfg)
    except (LaunchError, TrackingError, DatasetError, CheckpointError, NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    minutes = (time.perf_counter() - t0) / 60
    print()
    if outcome.table:
        print(outcome.table)
    print(f"finished in {minutes:.1f} min")
    print(f"  outputs:    {outcome.output_dir}")
    print(f"  checkpoint: {outcome.checkpoint_path}")
    if outcome.run_id:
        print(f"  mlflow:     run {outcome.run_id} in {outcome.tracking_uri}")
        print(f"              browse: mlflow ui --backend-store-uri {outcome.tracking_uri} --host 127.0.0.1")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
