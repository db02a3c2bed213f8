"""COCO evaluation against pycocotools' COCOeval run directly on the same data, results conversion, tables.

The references are pycocotools itself (COCOeval on hand-built result dicts, see ``_eval_data``) and closed
forms (perfect predictions -> AP 100; no predictions -> AP 0).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math

import numpy as np
import pycocotools.mask as mask_util
import pytest
from _eval_data import CAT_IDS, EMPTY_IMAGE, IMAGE_SIZES, make_coco, make_predictions, reference_results, write_json
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from diffusioninst.config.schema import EvalConfig
from diffusioninst.evaluation import (
    EvalResult,
    Evaluator,
    build_evaluator,
    flat_metrics,
    format_ap_table,
    instances_to_coco_results,
    write_ap_tables,
)

BACKENDS = ("pycocotools", "faster_coco_eval")
# pycocotools.mask.decode (used by the tests' own data) trips numpy 2's __array__ copy-keyword deprecation
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
COCO_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


@pytest.fixture(scope="module")
def coco_data(tmp_path_factory):
    rng = np.random.default_rng(1234)
    dataset, objects = make_coco(rng)
    path = write_json(dataset, tmp_path_factory.mktemp("coco") / "instances.json")
    return path, dataset, objects, make_predictions(rng, objects)


def direct_cocoeval(gt_path, results, task, image_ids):
    """pycocotools COCOeval, run the documented way; returns (stats*100 with -1 -> nan, AP per category)."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        ev = COCOeval(gt, gt.loadRes(results), task)
        ev.params.imgIds = list(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [math.nan if s < 0 else s * 100 for s in ev.stats]
    per_cat = {}
    for k, cat in enumerate(ev.params.catIds):
        p = ev.eval["precision"][:, :, k, 0, -1]
        per_cat[cat] = float(np.mean(p[p > -1])) * 100 if (p > -1).any() else math.nan
    return dict(zip(COCO_NAMES, stats)), per_cat


def assert_close(ours: float, ref: float, what: str) -> None:
    assert (math.isnan(ours) and math.isnan(ref)) or abs(ours - ref) <= 1e-12, f"{what}: ours {ours} != ref {ref}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_coco_stats_equal_direct_pycocotools(coco_data, backend):
    path, dataset, _, preds = coco_data
    evaluated = {i: p for i, p in preds.items() if i != 21}  # a subset: image 21 is never added
    ev = Evaluator(path, kind="coco", tasks=("bbox", "segm"), backend=backend)
    for image_id, p in evaluated.items():
        ev.add(image_id, p)
    result = ev.compute()

    assert result.image_ids == sorted(evaluated)
    assert any(f"evaluated {len(evaluated)} of {len(IMAGE_SIZES)}" in n for n in result.notes)
    assert any("1 evaluated image(s) have no ground-truth" in n for n in result.notes)
    assert result.num_detections == sum(len(p["scores"]) for p in evaluated.values())
    for task in ("bbox", "segm"):
        ref_stats, ref_cat = direct_cocoeval(path, reference_results(evaluated, task), task, sorted(evaluated))
        assert list(result[task]) == list(COCO_NAMES)
        for name in COCO_NAMES:
            assert_close(result[task][name], ref_stats[name], f"{backend} {task} {name}")
        assert 20 < result[task]["AP"] < 95  # a non-trivial score, so the comparison means something
        for row in result.per_category:
            assert_close(row[task], ref_cat[row["category_id"]], f"{backend} {task} category {row['category_id']}")
        assert "Average Precision" in result.summaries[task]
    num_gt = dict.fromkeys(CAT_IDS, 0)
    for a in dataset["annotations"]:
        if a["image_id"] in evaluated and not a["iscrowd"]:
            num_gt[a["category_id"]] += 1
    assert {r["category_id"]: r["num_gt"] for r in result.per_category} == num_gt


def test_backends_agree_and_gt_object_is_reusable(coco_data):
    path, dataset, _, preds = coco_data
    results = {}
    for backend in BACKENDS:
        first = Evaluator(path, backend=backend)
        shared = Evaluator(first.gt, backend=backend)  # a loaded GT object is reused, not reloaded
        assert shared.gt is first.gt
        for image_id, p in preds.items():
            shared.add(image_id, p)
        results[backend] = shared.compute()
    for task in ("bbox", "segm"):
        for name in COCO_NAMES:
            assert_close(results["faster_coco_eval"][task][name], results["pycocotools"][task][name], name)
    dict_gt = Evaluator(dataset, tasks=("bbox",))  # a parsed dict works too; ready result dicts as well
    dict_gt.add_coco_results(reference_results(preds, "bbox"), image_ids=preds)
    assert dict_gt.compute()["bbox"] == results["pycocotools"]["bbox"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_perfect_predictions_give_ap_100(coco_data, backend):
    path, dataset, objects, _ = coco_data
    ev = Evaluator(path, backend=backend)
    for image_id, p in make_predictions(np.random.default_rng(0), objects, perfect=True).items():
        ev.add(image_id, p)
    result = ev.compute()
    for task in ("bbox", "segm"):
        for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"):
            assert result[task][name] == pytest.approx(100.0, abs=1e-9), (task, name)
        assert all(row[task] == pytest.approx(100.0, abs=1e-9) for row in result.per_category)


def test_category_id_mapping_round_trips(coco_data):
    path, _, _, preds = coco_data
    base = Evaluator(path, tasks=("bbox",))
    # a permuted contiguous order: label j means CAT_IDS[perm[j]]
    perm = [2, 0, 1]
    inverse = {cat_label: j for j, cat_label in enumerate(perm)}
    permuted = Evaluator(path, tasks=("bbox",), category_ids={j: CAT_IDS[perm[j]] for j in range(3)})
    for image_id, p in preds.items():
        base.add(image_id, p)
        permuted.add(image_id, {**p, "labels": np.array([inverse[int(x)] for x in p["labels"]], np.int64)})
    assert {r["category_id"] for r in base.coco_results} <= set(CAT_IDS)
    assert [r["category_id"] for r in base.coco_results] == [r["category_id"] for r in permuted.coco_results]
    a, b = base.compute(), permuted.compute()
    assert a["bbox"] == b["bbox"]
    assert [r["category_id"] for r in a.per_category] == CAT_IDS
    fresh = Evaluator(path, tasks=("bbox",))
    with pytest.raises(ValueError, match="labels \\[3\\] have no category id"):
        fresh.add(EMPTY_IMAGE, {"boxes": np.zeros((1, 4)), "scores": [0.5], "labels": [3]})
    assert fresh.image_ids == []  # a rejected image is not counted as evaluated
    with pytest.raises(ValueError, match="not categories of the ground truth"):
        Evaluator(path, category_ids=[1, 2, 3])


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_predictions_gives_zero_ap_and_a_note(coco_data, backend):
    path, *_ = coco_data
    ev = Evaluator(path, backend=backend)
    for image_id, (h, w) in IMAGE_SIZES.items():
        ev.add(image_id, {"boxes": np.zeros((0, 4)), "scores": [], "labels": [], "masks": np.zeros((0, h, w), bool)})
    result = ev.compute()
    assert any("no predictions at all" in n for n in result.notes)
    for task in ("bbox", "segm"):
        for name in ("AP", "AP50", "AP75", "AR100"):
            assert result[task][name] == 0.0
        assert all(row[task] == 0.0 for row in result.per_category if row["num_gt"])


def test_add_rejects_bad_input(coco_data, tmp_path):
    path, _, _, preds = coco_data
    ev = Evaluator(path)
    p = preds[3]
    with pytest.raises(KeyError, match="image id 999 is not in the ground truth"):
        ev.add(999, p)
    with pytest.raises(ValueError, match="masks have size"):
        ev.add(7, p)  # image 7 is 96x128, these masks are 120x160
    with pytest.raises(KeyError, match="needs 'masks'"):
        ev.add(3, {k: v for k, v in p.items() if k != "masks"})
    ev.add(3, p)
    with pytest.raises(ValueError, match="already added"):
        ev.add(3, p)
    with pytest.raises(RuntimeError, match="no image was added"):
        Evaluator(path).compute()
    with pytest.raises(ValueError, match="three increasing"):
        Evaluator(path, max_dets=[100])
    with pytest.raises(FileNotFoundError):
        Evaluator(tmp_path / "missing.json")


def test_results_conversion_from_numpy_torch_and_rles():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    masks = rng.random((3, 20, 30)) < 0.3
    pred = {
        "boxes": np.array([[1.5, 2.25, 10.5, 12.0], [0, 0, 30, 20], [5, 5, 6, 7]], np.float32),
        "scores": np.array([0.9, 0.25, 0.1], np.float32),
        "labels": np.array([2, 0, 1]),
        "masks": masks,
    }
    out = instances_to_coco_results(11, pred, CAT_IDS, image_size=(20, 30))
    assert [r["category_id"] for r in out] == [90, 1, 5]
    assert out[0]["bbox"] == [1.5, 2.25, 9.0, 9.75] and out[0]["score"] == pytest.approx(0.9)
    for r, m in zip(out, masks):
        assert isinstance(r["segmentation"]["counts"], str)
        assert np.array_equal(mask_util.decode(r["segmentation"]).astype(bool), m)
    json.dumps(out)
    as_torch = {k: torch.as_tensor(v) for k, v in pred.items()}
    assert instances_to_coco_results(11, as_torch, CAT_IDS) == out
    rles = [mask_util.encode(np.asfortranarray(m[:, :, None].astype(np.uint8)))[0] for m in masks]  # bytes counts
    from_rles = {**{k: v for k, v in pred.items() if k != "masks"}, "rles": rles}
    assert instances_to_coco_results(11, from_rles, {0: 1, 1: 5, 2: 90}) == out
    no_masks = instances_to_coco_results(11, pred, CAT_IDS, with_masks=False)
    assert all("segmentation" not in r for r in no_masks)


def _two_step_results(path, preds):
    results = {}
    for steps, drop in ((1, 0), (4, 1)):  # a second "run" that misses some detections
        ev = Evaluator(path)
        for image_id, p in preds.items():
            keep = np.arange(len(p["scores"])) % 3 != 2 if drop else slice(None)
            ev.add(image_id, {k: v[keep] for k, v in p.items()})
        results[steps] = ev.compute()
    return results


def test_ap_tables_and_metric_names(coco_data, tmp_path):
    path, _, _, preds = coco_data
    results = _two_step_results(path, preds)
    paths = write_ap_tables(results, tmp_path / "tables", "coco")
    assert set(paths) == {"ap_table.md", "ap_table.csv", "ap_table.json", "per_category_ap.csv", "per_category_ap.md"}

    md = paths["ap_table.md"].read_text().splitlines()
    assert md == format_ap_table(results, "coco").splitlines()
    assert [c.strip() for c in md[0].strip("|").split("|")] == [
        "steps",
        "task",
        "AP",
        "AP50",
        "AP75",
        "APs",
        "APm",
        "APl",
    ]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in md[2:]]
    assert [(r[0], r[1]) for r in rows] == [("1", "bbox"), ("1", "segm"), ("4", "bbox"), ("4", "segm")]
    for r in rows:
        stats = results[int(r[0])][r[1]]
        assert r[2:] == [
            f"{stats[c]:.1f}" if not math.isnan(stats[c]) else "nan"
            for c in ("AP", "AP50", "AP75", "APs", "APm", "APl")
        ]

    with paths["ap_table.csv"].open() as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["steps", "task", *COCO_NAMES]
    assert float(table[3]["AP"]) == results[4]["segm"]["AP"]

    doc = json.loads(paths["ap_table.json"].read_text(), parse_constant=lambda c: pytest.fail(f"non-strict {c}"))
    assert doc["results"]["4"]["stats"]["segm"]["AR100"] == pytest.approx(results[4]["segm"]["AR100"])
    assert len(doc["rows"]) == 4 and doc["ap_columns"] == list(COCO_NAMES[:6])
    back = EvalResult.from_dict(doc["results"]["1"])  # JSON round trip (null -> NaN)
    assert back.image_ids == results[1].image_ids and back.tasks == results[1].tasks
    for task in back.tasks:
        for name in COCO_NAMES:
            assert_close(back[task][name], results[1][task][name], name)

    with paths["per_category_ap.csv"].open() as f:
        cats = list(csv.DictReader(f))
    assert list(cats[0]) == ["steps", "category_id", "name", "num_gt", "bbox", "segm"]
    assert [(int(c["steps"]), int(c["category_id"])) for c in cats] == [(s, c) for s in (1, 4) for c in CAT_IDS]
    assert len(paths["per_category_ap.md"].read_text().splitlines()) == 2 + 2 * len(CAT_IDS)

    metrics = flat_metrics(results, "coco")
    expected = {f"eval/steps_{s}/{t}/{c}" for s in (1, 4) for t in ("bbox", "segm") for c in COCO_NAMES[:6]}
    assert set(metrics) == expected
    assert metrics["eval/steps_4/segm/AP"] == results[4]["segm"]["AP"]
    with pytest.raises(ValueError, match="'coco' evaluation"):
        flat_metrics(results, "lvis")


def test_eval_config_defaults_and_builder(coco_data):
    path, *_ = coco_data
    cfg = EvalConfig()
    assert cfg.coco_max_dets == [1, 10, 100] and cfg.lvis_max_dets == 300 and cfg.backend == "pycocotools"
    ev = build_evaluator(path, cfg)
    assert ev.kind == "coco" and ev.max_dets == [1, 10, 100] and ev.tasks == ("bbox", "segm")
    cfg.backend, cfg.tasks = "faster_coco_eval", ["segm"]
    ev = build_evaluator(path, cfg, category_ids=CAT_IDS)
    assert ev.backend == "faster_coco_eval" and ev.tasks == ("segm",)
    assert EvalConfig(coco_max_dets=[100, 10, 1]).check() == [
        ("eval.coco_max_dets", "must be three increasing values, got [100, 10, 1]")
    ]


def _two_image_gt() -> COCO:
    gt = COCO()
    gt.dataset = {
        "images": [{"id": 1, "height": 100, "width": 100}, {"id": 2, "height": 100, "width": 100}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "area": 900, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [60, 60, 30, 30], "area": 900, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [20, 50, 40, 20], "area": 800, "iscrowd": 0},
        ],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def test_class_error_breakdown_closed_form():
    """Exact GT boxes with every class swapped: standard AP 0, class-agnostic and oracle-class AP 100; one extra
    top-scoring detection overlapping nothing keeps its class (a false positive of class 1 ranked first:
    class 1 precision 2/3 at every recall -> 66.7, class 2 100, mean 83.3)."""
    from diffusioninst.evaluation.diagnostics import class_error_breakdown, relabel_by_overlap

    gt = _two_image_gt()
    swapped = [
        {"image_id": 1, "category_id": 2, "bbox": [10, 10, 30, 30], "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": [60, 60, 30, 30], "score": 0.8},
        {"image_id": 2, "category_id": 2, "bbox": [20, 50, 40, 20], "score": 0.7},
    ]
    out = class_error_breakdown(gt, swapped, tasks=("bbox",))["bbox"]
    assert out["standard"]["AP"] == pytest.approx(0.0)
    assert out["class_agnostic"]["AP"] == pytest.approx(100.0)
    assert out["oracle_class"]["AP"] == pytest.approx(100.0)

    stray = {"image_id": 2, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.95}
    relabelled = relabel_by_overlap(gt, [*swapped, stray])
    assert [d["category_id"] for d in relabelled] == [1, 2, 1, 1]
    assert swapped[0]["category_id"] == 2  # inputs are not modified
    out = class_error_breakdown(gt, [*swapped, stray], tasks=("bbox",))["bbox"]
    assert out["oracle_class"]["AP"] == pytest.approx(100 * (2 / 3 + 1) / 2, abs=0.01)
    assert out["standard"]["AP"] == pytest.approx(0.0)


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_evaluate_coco_class_agnostic(backend):
    """``use_cats=False`` on exact boxes with swapped classes: AP 100 (0 class-aware), no per-category AP."""
    from diffusioninst.evaluation.backends import evaluate_coco

    gt = _two_image_gt()
    swapped = [
        {"image_id": 1, "category_id": 2, "bbox": [10, 10, 30, 30], "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": [60, 60, 30, 30], "score": 0.8},
        {"image_id": 2, "category_id": 2, "bbox": [20, 50, 40, 20], "score": 0.7},
    ]
    args = (gt, [dict(r) for r in swapped], "bbox", [1, 2], [1, 10, 100], backend)
    agnostic = evaluate_coco(*args, use_cats=False)
    assert agnostic.stats["AP"] == pytest.approx(100.0) and agnostic.category_ap == {}
    aware = evaluate_coco(*args)
    assert aware.stats["AP"] == pytest.approx(0.0) and set(aware.category_ap) == {1, 2}
