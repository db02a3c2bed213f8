"""Evaluation speed: results encoding (masks -> RLE) and COCO/LVIS AP time per backend.

Generates a COCO-format GT (``--images`` images of ``--height`` x ``--width``, a few objects each) and
``--dets`` detections per image (perturbed GT plus false positives, bool masks in the image frame), then
measures:

* conversion of the predictions to COCO results (``instances_to_coco_results``; mask encoding dominates),
  with the cropped RLE encoder (default) and the dense ``pycocotools.mask.encode`` reference;
* ``Evaluator.compute`` per task for COCO and LVIS (same data with LVIS fields) with both backends, and the
  largest difference between the backends' statistics.

Usage: ``python benchmarks/eval_speed.py [--images 100 --dets 100 --height 480 --width 640]``; writes
``benchmarks/results/eval_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util

from diffusioninst.evaluation import Evaluator, encode_masks_cropped, encode_masks_dense, instances_to_coco_results

NUM_CATS = 20


def ellipse(h: int, w: int, box: np.ndarray) -> np.ndarray:
    x1, y1, x2, y2 = box
    ys, xs = np.ogrid[:h, :w]
    cy, cx, ry, rx = (y1 + y2) / 2, (x1 + x2) / 2, max((y2 - y1) / 2, 1), max((x2 - x1) / 2, 1)
    return ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1


def random_box(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    bw, bh = rng.uniform(8, w / 2), rng.uniform(8, h / 2)
    x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
    return np.array([x, y, x + bw, y + bh])


def make_gt(rng: np.random.Generator, n: int, h: int, w: int) -> tuple[dict, dict]:
    images, anns, objects = [], [], {}
    for i in range(1, n + 1):
        neg = sorted(int(c) for c in rng.choice(np.arange(1, NUM_CATS + 1), 3, replace=False))
        images.append({"id": i, "height": h, "width": w, "file_name": f"{i}.jpg", "neg_category_ids": neg})
        images[-1]["not_exhaustive_category_ids"] = []
        objects[i] = []
        for _ in range(int(rng.integers(3, 12))):
            box, cat = random_box(rng, h, w), int(rng.integers(1, NUM_CATS + 1))
            if cat in neg:
                continue
            m = ellipse(h, w, box)
            rle = mask_util.encode(np.asfortranarray(m[:, :, None].astype(np.uint8)))[0]
            area, bbox = float(mask_util.area(rle)), mask_util.toBbox(rle).tolist()
            rle["counts"] = rle["counts"].decode()
            anns.append(
                {"id": len(anns) + 1, "image_id": i, "category_id": cat, "segmentation": rle, "area": area}
                | {"bbox": bbox, "iscrowd": 0}
            )
            objects[i].append((box, cat))
    freq = "rcf"
    cats = [{"id": c, "name": f"c{c}", "frequency": freq[c % 3]} for c in range(1, NUM_CATS + 1)]
    return {"images": images, "annotations": anns, "categories": cats}, objects


def predictions(rng: np.random.Generator, objects: list, dets: int, h: int, w: int) -> dict:
    boxes, labels = [], []
    for box, cat in objects:
        for _ in range(3):  # several hypotheses per object, as a detector's ensemble gives
            boxes.append(np.clip(box + rng.normal(0, 4, 4), 0, [w, h, w, h]))
            labels.append(cat - 1)
    while len(boxes) < dets:
        boxes.append(random_box(rng, h, w))
        labels.append(int(rng.integers(0, NUM_CATS)))
    boxes, labels = np.array(boxes[:dets], np.float32), np.array(labels[:dets], np.int64)
    masks = np.stack([ellipse(h, w, b) for b in boxes])
    return {"boxes": boxes, "scores": rng.random(dets).astype(np.float32), "labels": labels, "masks": masks}


def time_encoders(masks: np.ndarray, repeat: int = 3) -> dict[str, float]:
    out = {}
    for name, fn in (("cropped", encode_masks_cropped), ("dense", encode_masks_dense)):
        best = math.inf
        for _ in range(repeat):
            start = time.perf_counter()
            fn(masks)
            best = min(best, time.perf_counter() - start)
        out[name] = best
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--dets", type=int, default=100)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "eval_speed.json")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    h, w = args.height, args.width
    dataset, objects = make_gt(rng, args.images, h, w)
    cat_ids = list(range(1, NUM_CATS + 1))

    results, convert_s, encode = [], 0.0, {"cropped": 0.0, "dense": 0.0}
    for image_id, objs in objects.items():
        pred = predictions(rng, objs, args.dets, h, w)
        start = time.perf_counter()
        results += instances_to_coco_results(image_id, pred, cat_ids, image_size=(h, w))
        convert_s += time.perf_counter() - start
        for k, v in time_encoders(pred["masks"], repeat=1).items():
            encode[k] += v
    big = predictions(rng, [(random_box(rng, 800, 1200), 1) for _ in range(10)], 100, 800, 1200)["masks"]
    big_times = time_encoders(big)

    report: dict = {
        "setup": {
            "images": args.images,
            "detections_per_image": args.dets,
            "image_size": [h, w],
            "gt_instances": len(dataset["annotations"]),
            "machine": f"{platform.processor() or platform.machine()}, {platform.python_version()}",
        },
        "convert_to_coco_results_s": convert_s,
        "convert_ms_per_image": 1000 * convert_s / args.images,
        "encode_s": encode,
        "encode_speedup_cropped_vs_dense": encode["dense"] / encode["cropped"],
        "encode_100_masks_800x1200_ms": {k: 1000 * v for k, v in big_times.items()},
        "evaluate_s": {},
        "max_abs_stat_diff_between_backends": {},
    }
    for kind in ("coco", "lvis"):
        stats = {}
        for backend in ("pycocotools", "faster_coco_eval"):
            ev = Evaluator(dataset, kind=kind, backend=backend, category_ids=cat_ids)
            ev.add_coco_results(results, image_ids=objects)
            res = ev.compute()
            report["evaluate_s"][f"{kind}/{backend}"] = {**res.seconds, "total": sum(res.seconds.values())}
            stats[backend] = res.stats
            print(f"{kind:4s} {backend:16s} " + " ".join(f"{t}={s:.2f}s" for t, s in res.seconds.items()))
        diffs = [
            abs(a - stats["faster_coco_eval"][t][k])
            for t, s in stats["pycocotools"].items()
            for k, a in s.items()
            if not (math.isnan(a) and math.isnan(stats["faster_coco_eval"][t][k]))
        ]
        report["max_abs_stat_diff_between_backends"][kind] = max(diffs)
        ref, fast = (report["evaluate_s"][f"{kind}/{b}"]["total"] for b in ("pycocotools", "faster_coco_eval"))
        report["evaluate_s"][f"{kind}/speedup"] = ref / fast
        report[f"{kind}_stats_pycocotools"] = stats["pycocotools"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if not k.endswith("_stats_pycocotools")}, indent=2))


if __name__ == "__main__":
    main()
