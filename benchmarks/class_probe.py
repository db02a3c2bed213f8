"""Does a checkpoint's head see the classes? Classifier accuracy and linear probes on GT boxes.

Feeds the GT boxes of ``--batches`` training batches (the training loader, with its augmentation) to the
head as clean proposals (t = 0) and reports, per stage:

* the accuracy of the classifier's top class on those boxes;
* the test accuracy of a linear probe (softmax regression, L-BFGS, 2/3 of the instances to fit and 1/3 to
  test) on the stage's object features, and on the first stage's pooled RoI features (d x 7 x 7).

A probe well above the classifier means the information is in the features and the head has not used it.

Usage::

    python benchmarks/class_probe.py --checkpoint runs/demo/checkpoint_0000449 [--batches 15]

Writes ``<output>.json`` (default ``benchmarks/results/class_probe.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusioninst.config import ExperimentConfig, load_config
from diffusioninst.engine.predictor import find_config, load_model


def linear_probe(x: torch.Tensor, y: torch.Tensor, num_classes: int, seed: int = 0) -> dict[str, float]:
    """Softmax regression on standardised ``x`` [n, f] -> ``y`` [n]; accuracy on the fit and held-out thirds."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(y), generator=g)
    fit, test = idx[: len(y) * 2 // 3], idx[len(y) * 2 // 3 :]
    mean, std = x[fit].mean(0), x[fit].std(0) + 1e-6
    x = (x - mean) / std
    w = torch.zeros(x.shape[1], num_classes, requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x[fit] @ w + b, y[fit]) + 1e-3 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = (x @ w + b).argmax(1)
    return {
        "fit_accuracy": float((pred[fit] == y[fit]).float().mean()),
        "test_accuracy": float((pred[test] == y[test]).float().mean()),
    }


@torch.no_grad()
def collect(model, cfg: ExperimentConfig, batches: int) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
    from diffusioninst.data import build_train_loader

    it = iter(build_train_loader(cfg, rank=0, world_size=1))
    labels, feats = [], {"roi": [], "hits": []}
    for _ in range(batches):
        batch = next(it)
        enc = model._encode(model.preprocess(batch.images, batch.image_sizes), batch.image_sizes)
        for i, target in enumerate(batch.targets):
            trace: dict = {}
            out = model.head(
                [f[i : i + 1] for f in enc.features],
                target["boxes"].float()[None],
                torch.zeros(1, dtype=torch.long),
                trace=trace,
            )
            labels.append(target["labels"])
            feats["roi"].append(trace["stages"][0]["roi"].flatten(1))
            for s, stage in enumerate(trace["stages"]):
                feats.setdefault(f"obj_{s}", []).append(stage["obj"].reshape(-1, stage["obj"].shape[-1]))
            feats["hits"].append(out["logits"][:, 0].argmax(-1) == target["labels"][None])  # [S, G]
    return torch.cat(labels), feats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--config", default=None, help="experiment config (default: the checkpoint's own)")
    parser.add_argument("--batches", type=int, default=15, help="training batches of GT boxes (default 15)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "class_probe"))
    args = parser.parse_args(argv)
    config = args.config or find_config(args.checkpoint)
    if config is None:
        parser.error(f"{args.checkpoint}: no config.yaml next to the checkpoint; pass --config")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg = load_config(ExperimentConfig, config, [])
    model = load_model(cfg, args.checkpoint).eval()
    k = cfg.model.head.num_classes
    y, feats = collect(model, cfg, args.batches)
    hits = torch.cat(feats.pop("hits"), dim=1).float().mean(1)
    report = {
        "checkpoint": str(args.checkpoint),
        "instances": len(y),
        "class_counts": torch.bincount(y, minlength=k).tolist(),
        "classifier_accuracy_per_stage": [round(float(h), 4) for h in hits],
        "linear_probe": {name: linear_probe(torch.cat(v), y, k) for name, v in feats.items()},
    }
    out = Path(args.output).with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
