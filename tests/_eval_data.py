"""Generated COCO/LVIS ground truth and predictions for the evaluation tests.

Everything here is built with numpy and pycocotools directly (never with ``diffusioninst.evaluation``), so
the tests can use it as an independent reference: GT in every COCO segmentation flavour (polygons, multi-part
polygons, compressed RLE, uncompressed crowd RLE), predictions in the ``postprocess`` format (abs xyxy boxes,
contiguous labels, bool masks in the image frame) and the COCO result dicts a reference run would load.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util

CAT_IDS = [1, 5, 90]  # non-contiguous dataset ids; contiguous label i <-> CAT_IDS[i]
IMAGE_SIZES = {3: (120, 160), 7: (96, 128), 11: (200, 180), 20: (64, 64), 21: (150, 100), 42: (80, 120)}
EMPTY_IMAGE = 42  # an image without any annotation


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE (counts list, column-major, starting with zeros) by plain numpy."""
    flat = mask.ravel(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], change])).tolist()
    return {"size": list(mask.shape), "counts": counts}


def rle_of(mask: np.ndarray) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask[:, :, None].astype(np.uint8)))[0]
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _ellipse_polygon(rng: np.random.Generator, h: int, w: int, scale: float) -> list[float]:
    cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
    ry, rx = rng.uniform(0.3, 1.0) * scale, rng.uniform(0.3, 1.0) * scale
    t = np.linspace(0, 2 * np.pi, 14, endpoint=False)
    ys = np.clip(cy + ry * np.sin(t), 0, h - 1)
    xs = np.clip(cx + rx * np.cos(t), 0, w - 1)
    return np.stack([xs, ys], 1).ravel().round(2).tolist()


def _rect_mask(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    m = np.zeros((h, w), bool)
    for _ in range(rng.integers(1, 3)):  # union of 1-2 rectangles
        bh, bw = int(rng.uniform(0.3, 1.0) * scale) + 2, int(rng.uniform(0.3, 1.0) * scale) + 2
        y, x = rng.integers(0, max(h - bh, 1)), rng.integers(0, max(w - bw, 1))
        m[y : y + bh, x : x + bw] = True
    return m


def make_coco(rng: np.random.Generator) -> tuple[dict, dict[int, list[tuple[np.ndarray, int, int]]]]:
    """GT dataset dict and, per image, ``(mask, category_id, iscrowd)`` of every annotation."""
    images, anns, objects = [], [], {}
    ann_id = 100
    for image_id, (h, w) in IMAGE_SIZES.items():
        images.append({"id": image_id, "height": h, "width": w, "file_name": f"{image_id:06d}.jpg"})
        objects[image_id] = []
        if image_id == EMPTY_IMAGE:
            continue
        for k in range(int(rng.integers(3, 7))):
            cat = CAT_IDS[int(rng.integers(0, 3))]
            scale = float(rng.choice([12, 40, 110]))  # small / medium / large objects
            crowd = k == 0 and image_id in (3, 11)
            kind = "crowd" if crowd else ("polygon", "multipolygon", "rle")[k % 3]
            if kind in ("polygon", "multipolygon"):
                polys = [_ellipse_polygon(rng, h, w, scale)]
                if kind == "multipolygon":
                    polys.append(_ellipse_polygon(rng, h, w, scale / 2))
                segmentation: object = polys
                mask = mask_util.decode(mask_util.merge(mask_util.frPyObjects(polys, h, w))).astype(bool)
            else:
                mask = _rect_mask(rng, h, w, scale)
                segmentation = uncompressed_rle(mask) if crowd else rle_of(mask)
            rle = mask_util.encode(np.asfortranarray(mask[:, :, None].astype(np.uint8)))[0]
            anns.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": cat,
                    "segmentation": segmentation,
                    "area": float(mask_util.area(rle)),
                    "bbox": mask_util.toBbox(rle).tolist(),
                    "iscrowd": int(crowd),
                }
            )
            objects[image_id].append((mask, cat, int(crowd)))
            ann_id += 1
    categories = [{"id": c, "name": f"class_{c}", "supercategory": "thing"} for c in CAT_IDS]
    return {"images": images, "annotations": anns, "categories": categories}, objects


def _shifted(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(mask)
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    ys, xs = ys + dy, xs + dx
    keep = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    out[ys[keep], xs[keep]] = True
    return out


def _box_of(mask: np.ndarray, rng: np.random.Generator, noise: float) -> list[float]:
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return [0.0, 0.0, 0.0, 0.0]
    box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)
    return (box + rng.uniform(-noise, noise, 4)).tolist()


def make_predictions(
    rng: np.random.Generator, objects: dict[int, list[tuple[np.ndarray, int, int]]], perfect: bool = False
) -> dict[int, dict[str, np.ndarray]]:
    """Per image, ``postprocess``-format predictions: perturbed GT, duplicates, wrong classes, false positives,
    detections on crowd regions and tied scores (``perfect``: exactly the non-crowd GT, score 1)."""
    preds = {}
    for image_id, objs in objects.items():
        h, w = IMAGE_SIZES[image_id]
        dets: list[tuple[np.ndarray, list[float], int, float]] = []  # (mask, box, category id, score)
        for mask, cat, crowd in objs:
            if perfect:
                if not crowd:
                    dets.append((mask, _box_of(mask, rng, 0.0), cat, 1.0))
                continue
            if crowd:  # detections inside a crowd region are ignored, not false positives
                dets.append((_shifted(mask, 1, 0), _box_of(mask, rng, 1.0), cat, float(rng.uniform(0.2, 0.9))))
                continue
            if rng.random() < 0.85:
                moved = _shifted(mask, int(rng.integers(-3, 4)), int(rng.integers(-3, 4)))
                dets.append((moved, _box_of(moved, rng, 2.0), cat, float(rng.uniform(0.3, 1.0))))
                if rng.random() < 0.35:  # duplicate with a lower score
                    dup = _shifted(mask, 2, -2)
                    dets.append((dup, _box_of(mask, rng, 3.0), cat, float(rng.uniform(0.05, 0.3))))
            if rng.random() < 0.2:  # wrong class
                wrong = CAT_IDS[(CAT_IDS.index(cat) + 1) % 3]
                dets.append((mask, _box_of(mask, rng, 1.0), wrong, float(rng.uniform(0, 0.6))))
        if not perfect:
            for _ in range(2):  # false positives, two of them with the same score
                fp = _rect_mask(rng, h, w, 20.0)
                dets.append((fp, _box_of(fp, rng, 1.0), CAT_IDS[int(rng.integers(0, 3))], 0.5))
        preds[image_id] = {
            "boxes": np.array([d[1] for d in dets], np.float32).reshape(-1, 4),
            "scores": np.array([d[3] for d in dets], np.float32),
            "labels": np.array([CAT_IDS.index(d[2]) for d in dets], np.int64),
            "masks": np.array([d[0] for d in dets], bool).reshape(-1, h, w),
        }
    return preds


def reference_results(preds: dict[int, dict[str, np.ndarray]], task: str, cat_ids: list[int] = CAT_IDS) -> list[dict]:
    """COCO result dicts built by hand: bbox xywh from float32 xyxy, one ``mask.encode`` per mask. segm results
    carry no bbox (detectron2's convention: areas for s/m/l then come from the masks)."""
    out = []
    for image_id, p in preds.items():
        for i in range(len(p["scores"])):
            r = {"image_id": image_id, "category_id": cat_ids[int(p["labels"][i])], "score": float(p["scores"][i])}
            if task == "bbox":
                x1, y1, x2, y2 = p["boxes"][i]
                r["bbox"] = [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]
            else:
                r["segmentation"] = rle_of(p["masks"][i])
            out.append(r)
    return out


def write_json(data: dict, path: Path) -> Path:
    path.write_text(json.dumps(data))
    return path


# ----------------------------------------------------------------------------------------------- LVIS
LVIS_CATS = {2: "r", 7: "c", 13: "f", 40: "f"}  # category id -> frequency group
LVIS_CAT_IDS = sorted(LVIS_CATS)
# image id -> (size, GT categories, neg_category_ids, not_exhaustive_category_ids)
LVIS_IMAGES = {
    1: ((120, 140), [2, 7, 7], [13], [7]),
    2: ((100, 160), [13, 40, 40], [2], [13]),
    3: ((150, 150), [7, 2], [], [40]),
    4: ((90, 110), [], [2, 7], []),
    5: ((130, 120), [2, 40, 13], [7], [2]),
    6: ((80, 80), [40], [], []),
}


def make_lvis(rng: np.random.Generator) -> tuple[dict, dict[int, list[tuple[np.ndarray, int, int]]]]:
    """LVIS-format GT (polygons, no iscrowd, r/c/f frequencies, non-empty federated lists)."""
    images, anns, objects = [], [], {}
    ann_id = 1
    for image_id, ((h, w), cats, neg, not_exhaustive) in LVIS_IMAGES.items():
        images.append(
            {
                "id": image_id,
                "height": h,
                "width": w,
                "coco_url": f"http://images.example/val/{image_id:012d}.jpg",
                "neg_category_ids": neg,
                "not_exhaustive_category_ids": not_exhaustive,
            }
        )
        objects[image_id] = []
        for cat in cats:
            poly = _ellipse_polygon(rng, h, w, float(rng.choice([14, 45, 90])))
            rle = mask_util.merge(mask_util.frPyObjects([poly], h, w))
            anns.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": cat,
                    "segmentation": [poly],
                    "area": float(mask_util.area(rle)),
                    "bbox": mask_util.toBbox(rle).tolist(),
                }
            )
            objects[image_id].append((mask_util.decode(rle).astype(bool), cat, 0))
            ann_id += 1
    categories = [
        {"id": c, "name": f"lvis_{c}", "frequency": f, "image_count": 1, "synset": f"s{c}.n.01"}
        for c, f in LVIS_CATS.items()
    ]
    return {"images": images, "annotations": anns, "categories": categories}, objects


def lvis_predictions(rng: np.random.Generator, objects: dict) -> dict[int, dict[str, np.ndarray]]:
    """Perturbed GT plus the federated edge cases on every image: a false positive of every category (some are
    in ``neg_category_ids`` -> counted, some in neither list -> ignored, some not exhaustive -> ignored when
    unmatched), and an empty-mask / zero-width-box detection (zero area: lvis-api never loads it)."""
    preds = {}
    for image_id, objs in objects.items():
        h, w = LVIS_IMAGES[image_id][0]
        masks, boxes, labels, scores = [], [], [], []
        for mask, cat, _ in objs:
            moved = _shifted(mask, int(rng.integers(-3, 4)), int(rng.integers(-3, 4)))
            masks.append(moved)
            boxes.append(_box_of(moved, rng, 2.0))
            labels.append(LVIS_CAT_IDS.index(cat))
            scores.append(float(rng.uniform(0.2, 1.0)))
        for cat in LVIS_CAT_IDS:
            fp = _rect_mask(rng, h, w, 15.0)
            masks.append(fp)
            boxes.append(_box_of(fp, rng, 1.0))
            labels.append(LVIS_CAT_IDS.index(cat))
            scores.append(float(rng.uniform(0.3, 0.95)))
        masks.append(np.zeros((h, w), bool))
        boxes.append([5.0, 5.0, 5.0, 30.0])  # zero width
        labels.append(LVIS_CAT_IDS.index(objs[0][1]) if objs else 0)
        scores.append(0.99)
        preds[image_id] = {
            "boxes": np.array(boxes, np.float32),
            "scores": np.array(scores, np.float32),
            "labels": np.array(labels, np.int64),
            "masks": np.array(masks, bool),
        }
    return preds
