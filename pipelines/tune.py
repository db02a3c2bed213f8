"""Run an ablation sweep (Ray Tune trials, or sampler settings on one checkpoint) and compare it in MLflow.

A sweep file is an experiment file (``_base_`` names the base experiment) plus a ``sweep:`` section; see
docs/tune.md. Train sweeps run one full training per trial (ASHA can stop bad ones early); sampler sweeps
evaluate one checkpoint under every sampler setting without retraining. Every trial/setting is a child run of
one MLflow parent run, which gets comparison.md/.csv/.png (also written to the sweep's output_dir).

Interrupted (Ctrl-C, killed driver)? Run the same command again: it resumes (finished trials and evaluated
settings are kept). --restart starts over; --resume refuses to start a new sweep.

Examples:
  python pipelines/tune.py experiments/ablation_lambda_smoke.yaml
  python pipelines/tune.py experiments/ablation_sampler_smoke.yaml --dry-run
  python pipelines/tune.py experiments/ablation_lambda.yaml --set sweep.max_concurrent_trials=4
  ray job submit --working-dir . -- python pipelines/tune.py experiments/ablation_lambda.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusioninst.config.cli import make_parser, resolve
from diffusioninst.config.sweep import SweepConfig


def build_parser():
    parser = make_parser(__doc__)
    parser.add_argument("sweep_file", nargs="?", help="sweep YAML (same as --config)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue an interrupted sweep; fail if there is none")
    mode.add_argument(
        "--restart", action="store_true", help="delete the sweep's Tune/Train state and start over (new parent run)"
    )
    parser.add_argument("--dry-run", action="store_true", help="validate, list the trials/settings, and exit")
    return parser


def dry_run(cfg: SweepConfig) -> None:
    from diffusioninst.config.sweep import experiment_of
    from diffusioninst.tune.common import axis_label
    from diffusioninst.tune.space import expand, sampler_settings

    sweep = cfg.sweep
    variants = expand(sweep.search_space, sweep.num_samples, sweep.seed)
    if sweep.kind == "sampler":
        settings, dropped = sampler_settings(experiment_of(cfg).sampler, variants)
        print(f"{len(settings)} distinct sampler settings ({dropped} duplicates without effect dropped):")
        for shown, _ in settings:
            print(f"  {axis_label(shown)}")
        return
    random = any(next(iter(d)) != "grid_search" for d in sweep.search_space.values())
    note = ""
    if random:
        note = f" (random values drawn with seed {sweep.seed})" if sweep.seed is not None else " (one random draw)"
    print(f"{len(variants)} trials{note}:")
    for params in variants:
        print(f"  {axis_label(params)}")
    print(f"scheduler: {sweep.scheduler.type}; at most {sweep.max_concurrent_trials} at once; metric {sweep.metric}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    first = parser.parse_args(argv)
    if first.sweep_file and first.config:
        parser.error("give the sweep file once: positionally or with --config")
    if not (first.sweep_file or first.config or first.list_keys):
        parser.error("a sweep file is required, e.g. experiments/ablation_lambda_smoke.yaml")
    args, cfg = resolve(parser, SweepConfig, argv, config_from=lambda a: a.sweep_file)
    if args.dry_run:
        dry_run(cfg)
        return 0

    from diffusioninst.data import DatasetError
    from diffusioninst.engine.checkpoint import CheckpointError
    from diffusioninst.engine.launch import LaunchError
    from diffusioninst.tracking import TrackingError
    from diffusioninst.tune import run_sweep

    mode = "resume" if args.resume else "restart" if args.restart else "auto"
    try:
        run_sweep(cfg, mode)
    except (LaunchError, TrackingError, DatasetError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume the sweep", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
