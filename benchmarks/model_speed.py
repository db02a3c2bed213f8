"""Model speed: inference (1 and 4 DDIM steps) and one training iteration, with random weights.

Configs:
  r50   the official R50 COCO model (500 proposals, 6 stages, hidden 256, 80 classes) at 800x1216, batch 1,
        3 instances for training (official on the 2-core reference box: 10.6 s / 35.4 s / 20.2 s); its
        training iteration is also timed in the official order of work (benchmarks/official_like.py);
  demo  the small from-scratch demo model (experiments/demo.yaml) at 320x320, batch 4, ~5 instances.

Writes JSON (median of --runs, per-phase breakdown, torch version, threads) and checks that the fast
windowed mask rendering gives exactly the reference full-image pipeline's output.

    python benchmarks/model_speed.py --device cpu --threads 2 --configs r50 demo
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from host_info import cpu_model
from official_like import compare_with_ours, official_like_training

from diffusioninst.config import ExperimentConfig, load_config
from diffusioninst.config.schema import ModelConfig, SamplerConfig
from diffusioninst.engine.host import keep_freed_memory
from diffusioninst.model import Encoded, GeneratorNoise, build_model, postprocess

OFFICIAL = {"r50": {"infer_1step_s": 10.6, "infer_4step_s": 35.4, "train_iter_s": 20.2}}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    def __init__(self, device: torch.device):
        self.device = device
        self.times: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                _sync(timer.device)
                self.t, self.c = time.perf_counter(), time.process_time()
                self.ru = resource.getrusage(resource.RUSAGE_SELF)

            def __exit__(self, *exc):
                _sync(timer.device)
                timer.times[name] = timer.times.get(name, 0.0) + time.perf_counter() - self.t
                if name == "total":  # CPU seconds of this process (all threads): robust to other load
                    timer.times["cpu_total"] = time.process_time() - self.c
                    ru = resource.getrusage(resource.RUSAGE_SELF)  # kernel time: mostly page faults
                    timer.times["kernel_cpu_total"] = ru.ru_stime - self.ru.ru_stime
                    timer.times["minor_page_faults"] = ru.ru_minflt - self.ru.ru_minflt

        return _Ctx()


def synthetic_batch(batch: int, hw: tuple[int, int], instances: int, num_classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h, w = hw
    images = torch.randint(0, 256, (batch, 3, h, w), generator=g, dtype=torch.uint8)
    targets = []
    for _ in range(batch):
        xy = torch.rand(instances, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        wh = (torch.rand(instances, 2, generator=g) * 0.3 + 0.1) * torch.tensor([w, h])
        boxes = torch.cat([xy, xy + wh], 1)
        masks = torch.zeros(instances, h, w, dtype=torch.uint8)
        for k, (x1, y1, x2, y2) in enumerate(boxes.round().long().tolist()):
            masks[k, y1:y2, x1:x2] = 1
        labels = torch.randint(0, num_classes, (instances,), generator=g)
        targets.append({"boxes": boxes, "labels": labels, "masks": masks})
    sizes = torch.tensor([[h, w]] * batch)
    return images, sizes, targets


def official_like_inference(model, images, sizes, steps: int, seed: int) -> list[dict]:
    """The official order of work with our modules: F_mask recomputed at every step (the official head
    recomputes it per call), the dynamic mask head as a grouped conv over F_mask repeated per detection,
    every kept detection's mask upsampled over the whole image. Same outputs as the fast path."""
    with torch.no_grad():
        x = model.preprocess(images, sizes)
        feats = model.backbone(x)
        fpn = model.fpn([feats[n] for n in model.cfg.fpn.in_features])
        for _ in range(steps):
            mask_feat = model.mask_branch([fpn[n] for n in model.cfg.mask.in_features])
        enc = Encoded([fpn[n] for n in model.cfg.head.in_features], mask_feat, sizes, fpn)
        dets = model.sample(enc, SamplerConfig(steps=steps), [GeneratorNoise(seed)])
        outs = []
        for d, s in zip(dets, sizes.tolist()):
            m = len(d)
            w0, w1, w2, b0, b1, b2 = torch.split(d.kernels, [64, 64, 8, 8, 8, 1], dim=1)
            y = d.mask_feat[None].repeat(1, m, 1, 1)
            y = torch.relu(F.conv2d(y, w0.reshape(m * 8, 8, 1, 1), b0.reshape(-1), groups=m))
            y = torch.relu(F.conv2d(y, w1.reshape(m * 8, 8, 1, 1), b1.reshape(-1), groups=m))
            F.conv2d(y, w2.reshape(m, 8, 1, 1), b2.reshape(-1), groups=m)  # logits, as official
            outs.append(postprocess(d, d.image_size, tuple(s), mask_head=model.mask_head, reference=True))
    return outs


def bench_inference(model, images, sizes, steps: int, runs: int, device) -> dict:
    cfg = SamplerConfig(steps=steps)
    records = []
    for r in range(runs + 1):  # first run is warm-up
        timer = Timer(device)
        if model.cfg.mask.mask_channels == 8 and model.cfg.mask.head_layers == 3:
            with timer("official_like_total"):  # interleaved with ours: same machine load for both
                official_like_inference(model, images, sizes, steps, r)
        with torch.no_grad():
            with timer("total"):
                with timer("backbone_fpn"):
                    x = model.preprocess(images, sizes)
                    feats = model.backbone(x)
                    fpn = model.fpn([feats[n] for n in model.cfg.fpn.in_features])
                with timer("mask_branch"):
                    mask_feat = model.mask_branch([fpn[n] for n in model.cfg.mask.in_features])
                # = model.encode(images, sizes), split for the breakdown
                enc = Encoded([fpn[n] for n in model.cfg.head.in_features], mask_feat, sizes, fpn)
                with timer("sample_head_nms"):
                    dets = model.sample(enc, cfg, [GeneratorNoise(r)])
                with timer("postprocess"):
                    outs = [model.render(d, tuple(s)) for d, s in zip(dets, sizes.tolist())]
        t = timer.times
        t["detections"] = sum(len(o["scores"]) for o in outs)
        if r:
            records.append(t)
    return _summary(records), dets, outs


def _train_step(model, opt, params, images, sizes, targets, seed: int, timer: Timer | None = None) -> None:
    def phase(name: str):
        return timer(name) if timer is not None else contextlib.nullcontext()

    with phase("forward"):
        losses = model(images, sizes, targets, noise=[GeneratorNoise(seed + i) for i in range(len(targets))])
        loss = sum(losses.values())
    with phase("backward"):
        opt.zero_grad(set_to_none=True)
        loss.backward()
    with phase("optimizer"):
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()


def bench_train(model, images, sizes, targets, runs: int, device, warmup: int = 3, official_like: bool = False) -> dict:
    """Median of ``runs`` training iterations after ``warmup`` ones. The warm-up matters on CPU: the first
    iterations grow the heap (``host.keep_freed_memory``) and fault in fresh pages, which on some virtual
    machines costs seconds per iteration; training runs thousands of iterations at the steady state.

    ``official_like``: each timed iteration is preceded by one in the official order of work
    (``official_like.py``), so both see the same machine load; ``official_like_total`` is its median."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    try:  # the fused CPU kernel (torch >= 2.4) is several times faster than the per-tensor loop
        opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-4, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-4)
    records = []
    for r in range(warmup + runs):
        timer = Timer(device)
        if official_like:
            with official_like_training(model), timer("official_like_total"):
                _train_step(model, opt, params, images, sizes, targets, 1000 + r)
        with timer("total"):
            _train_step(model, opt, params, images, sizes, targets, 100 + r, timer)
        if r >= warmup:
            records.append(timer.times)
    model.eval()
    return _summary(records)


def _summary(records: list[dict]) -> dict:
    """Median of every timing (seconds) plus ``min_total`` (the shared 2-core box is noisy)."""
    out = {k: statistics.median(rec[k] for rec in records) for k in records[0]}
    out["min_total"] = min(rec["total"] for rec in records)
    if "official_like_total" in out:
        out["speedup_vs_official_like"] = statistics.median(r["official_like_total"] / r["total"] for r in records)
    return out


def check_fast_vs_reference(model, dets, sizes) -> dict:
    diffs, total = 0, 0
    for d, s in zip(dets, sizes.tolist()):
        fast = postprocess(d, d.image_size, tuple(s), mask_head=model.mask_head)
        ref = postprocess(d, d.image_size, tuple(s), mask_head=model.mask_head, reference=True)
        diffs += int((fast["masks"] != ref["masks"]).sum())
        total += ref["masks"].numel()
        assert torch.equal(fast["boxes"], ref["boxes"]) and torch.equal(fast["labels"], ref["labels"])
    return {"mask_pixels_differing": diffs, "mask_pixels": total, "identical": diffs == 0}


def model_config(name: str) -> tuple[ModelConfig, tuple[int, int], int, int]:
    if name == "r50":
        return ModelConfig(), (800, 1216), 1, 3
    if name == "demo":
        cfg = load_config(ExperimentConfig, ROOT / "experiments" / "demo.yaml")
        return (
            cfg.model,
            tuple(cfg.data.synthetic.image_size),
            cfg.solver.ims_per_batch // max(cfg.ray.num_workers, 1),
            5,
        )
    raise ValueError(f"unknown config {name}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--train-warmup", type=int, default=3, help="untimed training iterations first (heap growth)")
    p.add_argument("--configs", nargs="+", default=["r50", "demo"])
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/model_speed_<device>.json)")
    p.add_argument("--channels-last", action="store_true", help="model.channels_last (encoder in NHWC)")
    p.add_argument("--modes", nargs="+", default=["infer1", "infer4", "train"], help="infer1 infer4 train")
    p.add_argument("--merge", action="store_true", help="update entries of an existing JSON, do not replace it")
    p.add_argument(
        "--no-keep-freed-memory",
        action="store_true",
        help="leave glibc's malloc thresholds alone (host.keep_freed_memory false)",
    )
    args = p.parse_args(argv)
    kept = keep_freed_memory(not args.no_keep_freed_memory)  # before the first large tensor
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"model_speed_{device.type}.json"
    result = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "machine": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "runs": args.runs,
        "channels_last": args.channels_last,
        "keep_freed_memory": kept,
        "load_average_at_start": list(os.getloadavg()),
        "configs": {},
    }
    for name in args.configs:
        cfg, hw, batch, instances = model_config(name)
        cfg.channels_last = args.channels_last
        torch.manual_seed(0)
        model = build_model(cfg).to(device).eval()
        images, sizes, targets = synthetic_batch(batch, hw, instances, cfg.head.num_classes)
        images, sizes = images.to(device), sizes.to(device)
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        entry: dict = {"image_hw": list(hw), "batch": batch, "instances_per_image": instances}
        modes = [m for m in args.modes if name == "r50" or m == "train"]
        if "infer1" in modes:
            entry["infer_1step"], dets, _ = bench_inference(model, images, sizes, 1, args.runs, device)
            entry["infer_1step"]["load_average"] = os.getloadavg()[0]
            entry["fast_vs_reference"] = check_fast_vs_reference(model, dets, sizes)
        if "infer4" in modes:
            entry["infer_4step"], _, _ = bench_inference(model, images, sizes, 4, args.runs, device)
            entry["infer_4step"]["load_average"] = os.getloadavg()[0]
        if "train" in modes:
            # the official-shaped model on CPU, where our pooling backward and split Linear differ from autograd's
            official_shaped = name == "r50" and device.type == "cpu"
            if official_shaped:  # before the timed steps: the official order of work must give our results
                entry["official_like_vs_ours"] = compare_with_ours(model, images, sizes, targets)
            entry["train_iter"] = bench_train(
                model, images, sizes, targets, args.runs, device, args.train_warmup, official_like=official_shaped
            )
            entry["train_iter"]["load_average"] = os.getloadavg()[0]
            entry["train_images_per_s"] = batch / entry["train_iter"]["total"]
        if name == "r50":
            entry["official"] = OFFICIAL["r50"]
            keys = {"infer_1step": "infer_1step_s", "infer_4step": "infer_4step_s", "train_iter": "train_iter_s"}
            entry["speedup_vs_official"] = {
                k: OFFICIAL["r50"][v] / entry[k]["total"] for k, v in keys.items() if k in entry
            }
        result["configs"][name] = entry
        if args.merge and out.exists():
            previous = json.loads(out.read_text()).get("configs", {}).get(name, {})
            result["configs"][name] = {**previous, **entry}
            result["configs"][name]["speedup_vs_official"] = {
                **previous.get("speedup_vs_official", {}),
                **entry.get("speedup_vs_official", {}),
            }
        print(json.dumps({name: entry}, indent=1), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    result["load_average_at_end"] = list(os.getloadavg())
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: ru_maxrss in KiB
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
