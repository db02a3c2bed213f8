"""AP against training time for the embedded default (or any experiment).

Runs ``pipelines/train.py`` exactly as a user would (a fresh run named ``--name``, checkpoints every
``--checkpoint-period`` iterations and all of them kept), then evaluates every checkpoint on the validation
split at ``--steps`` sampling steps and writes the curve: mask and box AP against the training time stored in
each checkpoint (``train_seconds``, the clock the time budget runs on) and against the job's wall time.

Usage::

    python benchmarks/demo_curve.py [--config experiments/demo.yaml] [--set KEY=VALUE ...]
        [--checkpoint-period 100] [--steps 1] [--skip-train]

Writes ``benchmarks/results/demo_curve.json``, ``.csv`` and ``.png`` (``--output`` to change the stem).
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from host_info import cpu_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusioninst.config import ExperimentConfig, load_config
from diffusioninst.engine.checkpoint import META_FILE, STATE_FILE, read_state


def train(args: argparse.Namespace) -> tuple[float, float]:
    """Run the training job; returns its (start, end) wall-clock times."""
    overrides = [
        f"name={args.name}",
        f"output_dir=outputs/{args.name}",
        f"solver.checkpoint_period={args.checkpoint_period}",
        "ray.num_to_keep=1000",
        *args.set,
    ]
    cmd = [sys.executable, str(ROOT / "pipelines" / "train.py"), "--config", args.config, "--set", *overrides]
    print("$", " ".join(cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return start, time.time()


def checkpoints(storage: Path) -> list[Path]:
    return sorted({p.parent for p in storage.rglob(STATE_FILE)})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "experiments" / "demo.yaml"))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for training")
    parser.add_argument("--name", default="demo_curve", help="run name (its old checkpoints are deleted)")
    parser.add_argument("--checkpoint-period", type=int, default=100)
    parser.add_argument("--steps", type=int, nargs="+", default=[1])
    parser.add_argument("--skip-train", action="store_true", help="only evaluate the checkpoints already there")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "demo_curve"))
    args = parser.parse_args()

    from diffusioninst.data import ensure_dataset
    from diffusioninst.engine.evaluate import evaluate_model
    from diffusioninst.engine.predictor import load_model

    cfg = load_config(ExperimentConfig, args.config, [f"name={args.name}", *args.set])
    storage = (ROOT / cfg.ray.storage_path / args.name).resolve()
    job = None
    if not args.skip_train:
        shutil.rmtree(storage, ignore_errors=True)
        shutil.rmtree(ROOT / "outputs" / args.name, ignore_errors=True)
        job = train(args)
    cfg = ensure_dataset(cfg)
    torch.set_num_threads(2)
    rows = []
    for ckpt in checkpoints(storage):
        state = read_state(ckpt)
        meta = json.loads((ckpt / META_FILE).read_text()) if (ckpt / META_FILE).is_file() else {}
        model = load_model(cfg, ckpt, "cpu")
        outcome = evaluate_model(model, cfg, device=torch.device("cpu"), steps=args.steps)
        row = {
            "iteration": int(state["iteration"]),
            "train_seconds": round(float(state.get("train_seconds", float("nan"))), 1),
            "wall_seconds": round(meta["time"] - job[0], 1) if job and "time" in meta else None,
        }
        for s in args.steps:
            for task in ("segm", "bbox"):
                for col in ("AP", "AP50", "AP75"):
                    row[f"{task}_{col}_steps{s}"] = round(outcome.flat_metrics[f"eval/steps_{s}/{task}/{col}"], 2)
        print(json.dumps(row), flush=True)
        rows.append(row)
    rows.sort(key=lambda r: r["iteration"])
    if not rows:
        print(f"error: no checkpoints under {storage}", file=sys.stderr)
        return 1

    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "config": args.config,
        "overrides": args.set,
        "job_wall_seconds": round(job[1] - job[0], 1) if job else None,
        "machine": {
            "cpus": torch.get_num_threads(),
            "processor": platform.processor(),
            "cpu_model": cpu_model(),
            "torch": torch.__version__,
        },
        "curve": rows,
    }
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    with out.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.steps, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')}, .csv, .png")
    return 0


def plot(rows: list[dict], steps: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    minutes = [r["train_seconds"] / 60 for r in rows]
    for s in steps:
        ax.plot(minutes, [r[f"segm_AP_steps{s}"] for r in rows], "o-", label=f"mask AP, {s} step(s)")
        ax.plot(minutes, [r[f"bbox_AP_steps{s}"] for r in rows], "s--", label=f"box AP, {s} step(s)")
    ax.set_xlabel("training time (min)")
    ax.set_ylabel("AP (synthetic val)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
