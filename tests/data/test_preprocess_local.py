"""Preprocessing without Ray (``engine="local"``), checked against pycocotools / lvis, and the CLI.

The Ray engine writes the same bytes (tests/data/test_data_ray.py compares the two)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import make_dataset
from pycocotools.coco import COCO

from diffusioninst.data import masks as M
from diffusioninst.data.coco import read_coco
from diffusioninst.data.parquet import read_manifest, row_to_record
from diffusioninst.data.preprocess import preprocess
from diffusioninst.data.validation import DatasetError
from pipelines.preprocess import main as preprocess_cli


def _rows(out: Path) -> dict[int, dict]:
    return {r["image_id"]: r for p in sorted(out.glob("part-*.parquet")) for r in pq.read_table(p).to_pylist()}


def test_local_coco_counts_masks_and_checksums_match_pycocotools(synthetic, tmp_path):
    out, logs = tmp_path / "out", []
    manifest = preprocess("coco", synthetic.train_images, synthetic.train_json, out, shard_size=5, engine="local",
                          log=logs.append)  # fmt: skip
    coco = COCO(synthetic.train_json)
    rows = _rows(out)
    assert sorted(rows) == sorted(coco.imgs) and [s["rows"] for s in manifest["shards"]] == [5, 5, 5, 5, 4]
    assert "5/5 shard(s) done" in logs  # progress, one line per tenth of the shards (here: per shard)
    assert manifest["counts"]["instances"] == len(coco.anns) and manifest["skipped"] == {}
    assert manifest["counts"]["crowd_instances"] == sum(a["iscrowd"] for a in coco.anns.values())
    # images per category: pycocotools' index (crowd annotations included, as detectron2 counts them)
    assert [c["image_count"] for c in manifest["categories"]] == [
        len(coco.getImgIds(catIds=[c])) for c in sorted(coco.cats)
    ]
    for row in rows.values():
        for ann_id, rle in zip(row["ann_ids"], row["masks_rle"]):
            mask = M.rle_to_mask({"size": [row["height"], row["width"]], "counts": rle})
            np.testing.assert_array_equal(mask, coco.annToMask(coco.anns[ann_id]))
    files = {i: Path(synthetic.train_images) / coco.imgs[i]["file_name"] for i in sorted(coco.imgs)}
    expect = "".join(f"{i}:{hashlib.sha256(f.read_bytes()).hexdigest()};" for i, f in files.items())
    assert manifest["source"]["images_sha256"] == hashlib.sha256(expect.encode()).hexdigest()
    assert read_manifest(out) == manifest and not (out / ".staging").exists()
    # nothing was skipped: the GT the evaluator reads is the source file itself
    assert (out / "annotations.json").read_bytes() == Path(synthetic.train_json).read_bytes()


def test_local_lvis_keeps_federated_fields_and_matches_lvis_api(synthetic, tmp_path):
    from lvis import LVIS

    out = tmp_path / "out"
    manifest = preprocess("lvis", synthetic.val_images, synthetic.val_lvis_json, out, shard_size=3, engine="local",
                          log=lambda _: None)  # fmt: skip
    api, data = LVIS(synthetic.val_lvis_json), json.loads(Path(synthetic.val_lvis_json).read_text())
    rows = _rows(out)
    assert sorted(rows) == sorted(api.imgs) and manifest["counts"]["instances"] == len(api.anns)
    cats = sorted(data["categories"], key=lambda c: c["id"])
    assert [(c["id"], c["image_count"], c["frequency"]) for c in manifest["categories"]] == [
        (c["id"], c["image_count"], c["frequency"]) for c in cats]  # fmt: skip
    for iid, row in rows.items():
        assert row["neg_category_ids"] == api.imgs[iid]["neg_category_ids"]
        assert row["not_exhaustive_category_ids"] == api.imgs[iid]["not_exhaustive_category_ids"]
        rec = row_to_record(row)
        for inst, rle in zip(rec.instances, row["masks_rle"]):
            mask = M.rle_to_mask({"size": [row["height"], row["width"]], "counts": rle})
            np.testing.assert_array_equal(mask, api.ann_to_mask(api.anns[inst.ann_id]))


def test_cli_local_engine_and_bad_records(tmp_path, capsys):
    data, images = make_dataset(tmp_path)
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    out = tmp_path / "out"
    args = ["--format", "coco", "--images", str(images), "--annotations", str(ann), "--output", str(out)]
    assert preprocess_cli([*args, "--engine", "local", "--shard-size", "4"]) == 0
    assert read_manifest(out)["counts"]["images"] == 6 and len(list(out.glob("part-*.parquet"))) == 2

    (images / "gray.jpg").write_bytes(b"not a jpeg")
    bad = tmp_path / "bad_out"
    assert preprocess_cli([*args[:-1], str(bad), "--engine", "local"]) == 2
    err = capsys.readouterr().err
    assert "corrupt_image" in err and "gray.jpg" in err and "nothing was written" in err
    assert not bad.exists() or not list(bad.rglob("*"))
    assert preprocess_cli([*args, "--engine", "local", "--address", "ray://x:1"]) == 2
    assert "--address needs --engine ray" in capsys.readouterr().err


def test_checks_split_between_driver_and_shards_find_what_the_loader_finds(tmp_path):
    """The driver runs the whole-file checks and each shard task its annotations' own: together they report
    and skip exactly what the loader's one-pass checks do (``read_coco`` with every file decoded)."""
    from test_data_validation import CASES

    data, images = make_dataset(tmp_path)
    for bad in CASES.values():
        bad(data, images)
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))

    def issues(err):
        return sorted((i.reason, i.where, i.image_id or 0, i.ann_id or 0) for i in err.value.issues)

    with pytest.raises(DatasetError) as ref:
        read_coco(ann, images, check_files="decode")
    with pytest.raises(DatasetError) as got:
        preprocess("coco", images, ann, tmp_path / "out", shard_size=2, engine="local", log=lambda _: None)
    assert issues(got) == issues(ref) and len(issues(ref)) >= len(CASES)
    loaded = read_coco(ann, images, on_bad_record="skip", check_files="decode")
    manifest = preprocess("coco", images, ann, tmp_path / "out", "skip", shard_size=2, engine="local",
                          log=lambda _: None)  # fmt: skip
    assert manifest["skipped"] == loaded.report.counts()
    rows = _rows(tmp_path / "out")
    assert {a for r in rows.values() for a in r["ann_ids"]} == {i.ann_id for r in loaded.records for i in r.instances}
    gt = json.loads((tmp_path / "out" / "annotations.json").read_text())
    assert sorted(a["id"] for a in gt["annotations"]) == sorted(i.ann_id for r in loaded.records for i in r.instances)

    # only an annotation's own problem (found in its shard's task, after the other shards were staged):
    # under "error" nothing is left behind
    (tmp_path / "b").mkdir()
    data, images = make_dataset(tmp_path / "b")
    CASES["bbox_outside_image"](data, images)
    ann.write_text(json.dumps(data))
    out = tmp_path / "only_annotation"
    with pytest.raises(DatasetError) as got:
        preprocess("coco", images, ann, out, shard_size=2, engine="local", log=lambda _: None)
    assert [(i.reason, i.ann_id) for i in got.value.issues] == [("bbox_outside_image", 101)]
    assert not out.exists() or not list(out.rglob("*"))


def test_cleaned_gt_keeps_every_value_of_the_source(tmp_path):
    """With something skipped, annotations.json is the source minus the skipped records, value for value: written
    by msgspec for a standard JSON file, by the standard library when the file has NaN literals (msgspec would
    write null)."""
    data, images = make_dataset(tmp_path)
    data["annotations"][2]["bbox"] = [3, 3, 0, 10]  # bbox_zero_area: skipped
    data["images"][0]["license"], data["annotations"][0]["extra"] = 2**70, {"note": "caf\u00e9", "w": [0.1, -0.0]}
    for name, area in (("standard", 1e-300), ("nan", float("nan"))):
        data["annotations"][1]["area"] = area
        ann = tmp_path / f"{name}.json"
        ann.write_text(json.dumps(data))
        out = tmp_path / f"out_{name}"
        manifest = preprocess("coco", images, ann, out, "skip", engine="local", log=lambda _: None)
        assert manifest["skipped"] == {"bbox_zero_area": 1}
        gt, src = json.loads((out / "annotations.json").read_bytes()), json.loads(ann.read_text())
        expect = {**src, "annotations": [a for a in src["annotations"] if a["id"] != 102]}
        assert repr(gt) == repr(expect)  # repr: NaN != NaN, but its repr matches; -0.0 and big ints kept
        assert ("NaN" in (out / "annotations.json").read_text()) == (name == "nan")


def test_shard_inputs_reach_their_task_unchanged():
    from diffusioninst.data.preprocess import pack_part, unpack_part

    part = {"images": [{"id": 1, "file_name": "caf\u00e9.jpg", "x": [-0.0, 1e-320, 0.1, None, True]}],
            "annotations": [{"id": 2**63 - 1, "bbox": [float("nan"), 2, 3, 4]}], "category_ids": [1, 3]}  # fmt: skip
    for big in (False, True):  # msgpack, or pickle for an integer beyond 64 bits
        if big:
            part["images"][0]["license"] = 2**70
        blob = pack_part(part)
        assert blob[:1] == (b"P" if big else b"M")
        assert repr(unpack_part(blob)) == repr(part)  # repr: NaN compares unequal to itself


def test_ray_pass_progress_counts_this_runs_markers_at_every_tenth(tmp_path):
    import time

    from diffusioninst.data.preprocess import _MarkerProgress, _staged

    staging, logs = tmp_path / "staging", []
    staging.mkdir()
    # markers an earlier run left for other inputs, or cut short: not reused, and removed before the pass
    (staging / "part-00003.done.json").write_text(json.dumps({"fingerprint": "old", "written": True, "file": "x"}))
    (staging / "part-00004.done.json").write_text('{"fingerprint": "run')  # cut short: not reusable either
    parts = [{"images": [{"id": k}]} for k in range(20)]
    markers, tasks = _staged(parts, "run", staging)
    assert markers == {} and [t["shard"] for t in tasks] == list(range(20))
    assert not (staging / "part-00003.done.json").exists() and not (staging / "part-00004.done.json").exists()
    (staging / "part-00099.done.json").write_text("{}")  # not one of this pass's shards
    (staging / "part-00000.parquet").write_bytes(b"")  # a shard file without its marker is not done

    def wait_for(line: str) -> None:
        deadline = time.monotonic() + 10
        while line not in logs:
            assert time.monotonic() < deadline, (line, logs)
            time.sleep(0.005)

    with _MarkerProgress(staging, list(range(20)), logs.append, period=0.01) as progress:
        for k in range(20):
            (staging / f"part-{k:05d}.done.json").write_text("{}")
            if k % 2 == 1:  # every tenth of 20 shards: 2, 4, ..., 20
                wait_for(f"{k + 1}/20 shard(s) done")
        progress.finish()
    assert logs == [f"{n}/20 shard(s) done" for n in range(2, 21, 2)]  # each tenth once, the last not repeated
