"""LVIS evaluation: our Evaluator (lvis-api and faster-coco-eval backends) against lvis-api's LVISEval run
directly, on generated LVIS data with non-empty ``neg_category_ids`` / ``not_exhaustive_category_ids``, plus
the federated rules checked as closed-form properties (ignored detections leave every statistic unchanged).
"""

from __future__ import annotations

import math
from unittest import mock

import numpy as np
import pytest
from _eval_data import LVIS_CAT_IDS, LVIS_IMAGES, lvis_predictions, make_lvis, reference_results, write_json

from diffusioninst.evaluation import Evaluator, numpy_float_alias

BACKENDS = ("pycocotools", "faster_coco_eval")
NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf", "AR300", "ARs", "ARm", "ARl")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # lvis-api calls logger.warn


@pytest.fixture(scope="module")
def lvis_data(tmp_path_factory):
    rng = np.random.default_rng(7)
    dataset, objects = make_lvis(rng)
    path = write_json(dataset, tmp_path_factory.mktemp("lvis") / "lvis_val.json")
    return path, dataset, lvis_predictions(rng, objects)


def direct_lvis(path, results, task, image_ids, max_dets=300):
    """lvis-api used as documented (np.float patched for numpy 2 by the test itself)."""
    from lvis import LVIS, LVISEval, LVISResults

    gt = LVIS(str(path))
    ev = LVISEval(gt, LVISResults(gt, results, max_dets=max_dets), task)
    ev.params.img_ids = list(image_ids)
    ev.params.max_dets = max_dets  # only names the AR keys; the cap itself is LVISResults(max_dets=...)
    with mock.patch.object(np, "float", float, create=True):
        ev.run()
    r = ev.results
    keys = (*NAMES[:9], f"AR@{max_dets}", f"ARs@{max_dets}", f"ARm@{max_dets}", f"ARl@{max_dets}")
    stats = {n: (math.nan if r[k] < 0 else r[k] * 100) for n, k in zip(NAMES, keys)}
    per_cat = {}
    for k, cat in enumerate(ev.params.cat_ids):
        p = ev.eval["precision"][:, :, k, 0]
        per_cat[cat] = float(np.mean(p[p > -1])) * 100 if (p > -1).any() else math.nan
    return stats, per_cat


def run(path, preds, backend, tasks=("bbox", "segm"), max_dets=None):
    ev = Evaluator(path, kind="lvis", tasks=tasks, backend=backend, max_dets=max_dets)
    for image_id, p in preds.items():
        ev.add(image_id, p)
    return ev.compute()


def close(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_lvis_equals_direct_lvis_api(lvis_data, backend):
    path, _, preds = lvis_data
    evaluated = {i: p for i, p in preds.items() if i != 6}
    result = run(path, evaluated, backend)
    assert result.kind == "lvis" and list(result["segm"]) == list(NAMES)
    assert any("evaluated 5 of 6" in n for n in result.notes)
    assert any("zero-area detection(s) ignored" in n for n in result.notes)
    for task in ("bbox", "segm"):
        ref, ref_cat = direct_lvis(path, reference_results(evaluated, task, LVIS_CAT_IDS), task, sorted(evaluated))
        for name in NAMES:
            assert close(result[task][name], ref[name]), (backend, task, name, result[task][name], ref[name])
        for row in result.per_category:
            assert close(row[task], ref_cat[row["category_id"]]), (backend, task, row)
        assert 10 < result[task]["AP"] < 95
    assert [r["frequency"] for r in result.per_category] == ["r", "c", "f", "f"]
    assert "float" not in vars(np)  # the numpy shim is gone again


def _extra(preds, image_id, cat, box, score):
    """preds with one more detection (a box-shaped mask) on ``image_id``."""
    h, w = LVIS_IMAGES[image_id][0]
    p = dict(preds[image_id])
    mask = np.zeros((1, h, w), bool)
    x1, y1, x2, y2 = box
    mask[0, y1:y2, x1:x2] = True
    p["boxes"] = np.concatenate([p["boxes"], np.array([box], np.float32)])
    p["scores"] = np.concatenate([p["scores"], np.array([score], np.float32)])
    p["labels"] = np.concatenate([p["labels"], np.array([LVIS_CAT_IDS.index(cat)])])
    p["masks"] = np.concatenate([p["masks"], mask])
    return {**preds, image_id: p}


@pytest.mark.parametrize("backend", BACKENDS)
def test_federated_rules(lvis_data, backend):
    path, _, preds = lvis_data
    base = run(path, preds, backend)
    far = (0, 0, 6, 6)  # a corner box overlapping no GT object
    ignored = {
        "not exhaustive, no GT on the image, not negative": (3, 40),
        "neither in the image's GT nor in its negatives": (4, 13),
        "not exhaustive and unmatched, GT on the image": (1, 7),
    }
    for why, (image_id, cat) in ignored.items():
        changed = run(path, _extra(preds, image_id, cat, far, 0.999), backend)
        for task in ("bbox", "segm"):
            assert changed[task] == base[task], f"{why}: statistics changed"
    # a confident false positive of a category in neg_category_ids counts: image 4 lists 7 as negative
    hurt = run(path, _extra(preds, 4, 7, far, 0.999), backend)
    row = {r["category_id"]: r for r in hurt.per_category}[7]
    before = {r["category_id"]: r for r in base.per_category}[7]
    assert row["segm"] < before["segm"] and row["bbox"] < before["bbox"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_image_cap_matches_lvis_results(lvis_data, backend):
    path, _, preds = lvis_data
    result = run(path, preds, backend, tasks=("segm",), max_dets=3)
    assert result.max_dets == [3] and "AR3" in result["segm"]
    assert any("beyond the top 3 per image" in n for n in result.notes)
    ref, _ = direct_lvis(path, reference_results(preds, "segm", LVIS_CAT_IDS), "segm", sorted(preds), max_dets=3)
    for name, ref_name in zip((*NAMES[:9], "AR3", "ARs", "ARm", "ARl"), NAMES):
        assert close(result["segm"][name], ref[ref_name]), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_lvis_without_predictions(lvis_data, backend):
    path, *_ = lvis_data
    ev = Evaluator(path, kind="auto", backend=backend)
    assert ev.kind == "lvis"
    for image_id, ((h, w), *_) in LVIS_IMAGES.items():
        ev.add(image_id, {"boxes": np.zeros((0, 4)), "scores": [], "labels": [], "masks": np.zeros((0, h, w), bool)})
    result = ev.compute()
    assert any("no predictions at all" in n for n in result.notes)
    for task in ("bbox", "segm"):
        assert result[task]["AP"] == 0.0 and result[task]["APr"] == 0.0 and result[task]["AR300"] == 0.0


def test_numpy_float_alias_is_scoped():
    assert "float" not in vars(np)
    with numpy_float_alias():
        assert np.float is float
    assert "float" not in vars(np)
    with pytest.raises(RuntimeError), numpy_float_alias():
        raise RuntimeError("boom")
    assert "float" not in vars(np)


def test_lvis_ground_truth_must_have_federated_fields(lvis_data):
    _, dataset, _ = lvis_data
    broken = {**dataset, "images": [{k: v for k, v in i.items() if k != "neg_category_ids"} for i in dataset["images"]]}
    with pytest.raises(ValueError, match="neg_category_ids"):
        Evaluator(broken, kind="lvis")
