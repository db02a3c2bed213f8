"""Compare MLflow runs by their final box/mask AP: a table, a CSV and a plot of AP against each axis.

Select runs with exactly one of --parent (the trials of a sweep), --experiment (every run of an MLflow experiment
that logged eval/steps_* metrics) or --runs. The axes are the keys a sweep varied (from its tags), else every
parameter that differs between the runs; --axes overrides them.

Examples:
  python pipelines/compare.py --parent 5afc5e4df9ca4571ba9265856c133955
  python pipelines/compare.py --experiment diffusioninst-ablations --output outputs/compare
  python pipelines/compare.py --runs RUN_A RUN_B --axes model.loss.mask_weight --metric eval/steps_1/segm/AP
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--parent", metavar="RUN_ID", help="compare the child runs of this (sweep) run")
    which.add_argument("--experiment", metavar="NAME", help="compare every run of this MLflow experiment")
    which.add_argument("--runs", metavar="RUN_ID", nargs="+", help="compare these runs")
    parser.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlruns/mlflow.db)",
    )
    parser.add_argument("--axes", nargs="+", metavar="KEY", help="config keys that tell the runs apart")
    parser.add_argument("--metric", help="rank runs by this metric (default: the sweep's metric)")
    parser.add_argument("--mode", choices=("max", "min"), help="maximise or minimise --metric (default: the sweep's)")
    parser.add_argument("--output", help="write comparison.md/.csv/.png into this folder")
    parser.add_argument("--digits", type=int, default=1, help="decimals of AP in the printed table")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from diffusioninst.tracking import TrackingError, check_tracking_uri, resolve_tracking_uri
    from diffusioninst.tracking.compare import (
        METRIC_TAG,
        MODE_TAG,
        build_comparison,
        comparison_markdown,
        detect_axes,
        fetch_runs,
        write_comparison,
    )

    uri = resolve_tracking_uri(args.tracking_uri, ROOT)
    try:
        check_tracking_uri(uri)
        runs, parent_tags = fetch_runs(uri, experiment=args.experiment, run_ids=args.runs, parent=args.parent)
    except (TrackingError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # MlflowException for an unknown run id
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if not runs:
        print("error: none of the selected runs logged eval/steps_* metrics", file=sys.stderr)
        return 1
    tags = parent_tags or runs[0].tags
    axes = args.axes or detect_axes(runs, parent_tags)
    metric = args.metric or tags.get(METRIC_TAG)
    comp = build_comparison(runs, axes=axes, metric=metric, mode=args.mode or tags.get(MODE_TAG, "max"))
    print(comparison_markdown(comp, digits=args.digits), end="")
    if args.output:
        files = write_comparison(comp, args.output)
        print(f"written: {', '.join(str(p) for p in files.values())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
