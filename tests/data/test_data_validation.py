"""Every kind of bad input is reported (error policy) or skipped and counted (skip policy); odd images decode."""

from __future__ import annotations

import copy
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import H, W, _ann, make_dataset
from PIL import Image, ImageOps

from diffusioninst.data.coco import read_coco
from diffusioninst.data.image_io import decode_image, decode_with_info, inspect_image, probe_image
from diffusioninst.data.preprocess import preprocess
from diffusioninst.data.validation import DatasetError, load_json


def _write(tmp_path, data, name="ann.json"):
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return p


def test_non_rgb_images_decode_upright_rgb(tmp_path):
    data, d = make_dataset(tmp_path)
    loaded = read_coco(_write(tmp_path, data), d, check_files="decode")
    assert len(loaded.records) == 6 and not loaded.report.issues
    for img in data["images"]:
        raw = (d / img["file_name"]).read_bytes()
        ours, info = decode_with_info(raw)
        ref = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(raw))).convert("RGB"))
        assert ours.shape == (H, W, 3) and ours.dtype == np.uint8
        np.testing.assert_array_equal(ours, ref)
        assert info.needs_reencode == (img["file_name"] not in ("rgb.jpg", "rgb2.jpg"))
        assert inspect_image(raw) == info  # the preprocessor's check finds out the same without the array
        assert probe_image(d / img["file_name"]).height == H  # header probe applies the EXIF swap too
    # annotations are left in the displayed (upright) frame
    exif_rec = loaded.records[4]
    np.testing.assert_allclose(exif_rec.instances[0].box_xyxy, [2, 2, 20, 18])


CASES = {
    "missing_image_file": lambda data, d: (d / "gray.jpg").unlink(),
    "corrupt_image": lambda data, d: (d / "rgb.jpg").write_bytes((d / "rgb.jpg").read_bytes()[:200]),
    "image_size_mismatch": lambda data, d: data["images"][2].update(height=H + 1),
    "polygon_too_few_points": lambda data, d: data["annotations"][0].update(segmentation=[[1, 1, 5, 5]]),
    "bbox_outside_image": lambda data, d: data["annotations"][1].update(bbox=[20, 2, 30, 10]),
    "bbox_zero_area": lambda data, d: data["annotations"][2].update(bbox=[3, 3, 0, 10]),
    "unknown_category": lambda data, d: data["annotations"][3].update(category_id=42),
    "duplicate_image_id": lambda data, d: data["images"].append(dict(data["images"][5], file_name="x.jpg")),
    "unknown_image_id": lambda data, d: data["annotations"].append(_ann(999, 77)),
    "bad_segmentation": lambda data, d: data["annotations"][4].update(segmentation={"size": [5, 5], "counts": "00"}),
}


@pytest.mark.parametrize("reason", sorted(CASES))
def test_each_bad_record_is_reported_and_skippable(tmp_path, reason):
    data, d = make_dataset(tmp_path)
    CASES[reason](data, d)
    path = _write(tmp_path, data)
    with pytest.raises(DatasetError) as info:
        read_coco(path, d, on_bad_record="error", check_files="decode")
    assert {i.reason for i in info.value.issues} == {reason}
    issue = info.value.issues[0]
    assert str(issue.ann_id or issue.image_id) in str(info.value)  # names the record
    loaded = read_coco(path, d, on_bad_record="skip", check_files="decode")
    assert loaded.report.counts()[reason] >= 1
    kept_ids = {r.image_id for r in loaded.records}
    kept_anns = {i.ann_id for r in loaded.records for i in r.instances}
    if issue.ann_id is not None:
        assert issue.ann_id not in kept_anns and len(kept_ids) == 6
    else:
        assert issue.image_id not in kept_ids
        dropped_anns = [a["id"] for a in data["annotations"] if a["image_id"] == issue.image_id]
        assert not set(dropped_anns) & kept_anns
        assert loaded.report.counts().get("annotation_of_skipped_image", 0) == len(dropped_anns)
    # nothing silently dropped: every annotation is either kept or counted
    skipped_anns = {i.ann_id for i in loaded.report.issues if i.ann_id is not None}
    assert kept_anns | skipped_anns == {a["id"] for a in data["annotations"]}


def test_error_lists_every_problem_at_once(tmp_path):
    data, d = make_dataset(tmp_path)
    for fn in CASES.values():
        fn(data, d)
    with pytest.raises(DatasetError) as info:
        read_coco(_write(tmp_path, data), d, check_files="decode")
    msg = str(info.value)
    for reason in CASES:
        assert f"[{reason}]" in msg
    assert "annotation 999" in msg and "gray.jpg" in msg


def test_list_valued_ids_are_reported_not_raised(tmp_path):
    data, d = make_dataset(tmp_path)
    data["annotations"][0]["image_id"] = [1]  # JSON lists are unhashable: no lookup may raise on them
    data["annotations"][1]["category_id"] = [1]
    data["annotations"].append(_ann([9], 3))
    data["images"].append({"id": [7], "file_name": "rgb.jpg", "height": H, "width": W})
    data["categories"].append({"id": "2", "name": "string id"})  # not silently left out any more
    path = _write(tmp_path, data)
    with pytest.raises(DatasetError) as info:
        read_coco(path, d)
    assert sorted((i.reason, i.where, i.ann_id) for i in info.value.issues) == [
        ("bad_annotation_entry", "annotations[6]", None),
        ("bad_category_entry", "categories[1]", None),
        ("bad_image_entry", "images[6]", None),
        ("unknown_category", "annotation 101 (image 2)", 101),
        ("unknown_image_id", "annotation 100 (image [1])", 100),
    ]
    loaded = read_coco(path, d, on_bad_record="skip")
    assert sorted(i.ann_id for r in loaded.records for i in r.instances) == [102, 103, 104, 105]
    assert loaded.meta.category_ids == [1] and loaded.report.counts()["bad_category_entry"] == 1
    # the preprocessor (whole-file checks on its driver, the rest in its shard tasks) skips the same
    manifest = preprocess("coco", d, path, tmp_path / "out", "skip", engine="local", log=lambda _: None)
    assert manifest["skipped"] == loaded.report.counts() and manifest["counts"]["instances"] == 4


def test_empty_annotations_and_malformed_json(tmp_path):
    data, d = make_dataset(tmp_path)
    empty = copy.deepcopy(data)
    empty["annotations"] = []
    loaded = read_coco(_write(tmp_path, empty), d)
    assert len(loaded.records) == 6 and all(not r.instances for r in loaded.records)
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [], "annotations": [,]}')
    with pytest.raises(DatasetError, match=r"bad.json:1:\d+: invalid JSON.*malformed_json"):
        read_coco(bad, d, on_bad_record="skip")  # unreadable files fail under both policies
    bad.write_text('{"images": []}')
    with pytest.raises(DatasetError, match="'annotations' must be a list"):
        read_coco(bad, d)


def test_load_json_gives_the_standard_librarys_objects(tmp_path, synthetic):
    # the fast parser and the standard library agree, types included (ints stay ints, -0.0 and big ints kept)
    for path in (synthetic.train_json, synthetic.val_lvis_json):
        assert load_json(path) == json.loads(Path(path).read_text())
    odd = _write(tmp_path, {"images": [{"id": 2**70, "h": -0.0, "name": "\u00e9\u4e2d"}], "annotations": [],
                            "categories": [{"id": 1, "x": [1e-320, 1.7976931348623157e308, 0.1]}]})  # fmt: skip
    got, ref = load_json(odd), json.loads(odd.read_text())
    assert got == ref and repr(got) == repr(ref)
    # what the fast parser rejects but the standard library reads (NaN literals) still loads, and is reported
    data, d = make_dataset(tmp_path)
    nan = tmp_path / "nan.json"
    nan.write_text(json.dumps(data).replace('"bbox": [2, 2, 18, 16]', '"bbox": [2, NaN, 18, 16]', 1))
    assert math.isnan(load_json(nan)["annotations"][0]["bbox"][1])
    with pytest.raises(DatasetError) as info:
        read_coco(nan, d)
    assert [(i.reason, i.ann_id) for i in info.value.issues] == [("bad_bbox", 100)]
    latin = tmp_path / "latin1.json"
    latin.write_bytes(
        '{"images": [], "annotations": [], "categories": [{"id": 1, "name": "caf\u00e9"}]}'.encode("latin-1")
    )
    with pytest.raises(DatasetError, match=r"latin1.json: byte \d+: not UTF-8 text"):
        load_json(latin)


def test_lazy_annotations_keep_their_ids_and_exact_text(tmp_path, synthetic):
    """read_json(lazy_annotations=True), what the preprocessing driver reads: the rest of the file decoded as usual,
    each annotation as its ids plus its source text, which decodes (in the shard task) to the same entry and is
    written back unchanged into a cleaned GT file."""
    from diffusioninst.data.preprocess import _parts
    from diffusioninst.data.validation import (
        annotations_text,
        check_annotations,
        decode_annotations,
        encode_json,
        holds_refs,
        read_json,
    )

    for path in (synthetic.train_json, synthetic.val_lvis_json):
        src = json.loads(Path(path).read_text())
        data, standard = read_json(path, lazy_annotations=True)
        assert standard and holds_refs(data["annotations"]) and list(data) == list(src)
        rest = {k: v for k, v in src.items() if k != "annotations"}
        assert {k: v for k, v in data.items() if k != "annotations"} == rest
        ids = [{"id": a["id"], "image_id": a["image_id"]} for a in src["annotations"]]
        assert [dict(r) for r in data["annotations"]] == ids
        assert decode_annotations(annotations_text(data["annotations"])) == src["annotations"]
        assert json.loads(encode_json(data, standard)) == src
        eager = _parts(read_json(path)[0], 7)  # every shard task gets the same annotations either way
        lazy = _parts(data, 7)
        assert [p["images"] for p in lazy] == [p["images"] for p in eager]
        assert [decode_annotations(p["annotations_json"]) for p in lazy] == [p["annotations"] for p in eager]
        with pytest.raises(ValueError, match="per-annotation checks need decoded annotations"):
            check_annotations(data, str(path))
    data, d = make_dataset(tmp_path)
    text = json.dumps(data)
    partial = copy.deepcopy(data)
    del partial["annotations"][0]["id"], partial["annotations"][1]["image_id"]
    got = read_json(_write(tmp_path, partial), lazy_annotations=True)[0]["annotations"]
    assert dict(got[0]) == {"image_id": 1} and dict(got[1]) == {"id": 101}  # only the keys the entry has
    # a number beyond float range passes msgspec's skipping: its task decodes it as the standard library does,
    # and the preprocessor reports it as the loader does
    big = tmp_path / "big.json"
    big.write_text(text.replace('"bbox": [2, 2, 18, 16]', '"bbox": [2, 1e400, 18, 16]', 1))
    lazy, standard = read_json(big, lazy_annotations=True)
    assert standard and holds_refs(lazy["annotations"])
    assert decode_annotations(annotations_text(lazy["annotations"])) == json.loads(big.read_text())["annotations"]
    with pytest.raises(DatasetError) as ours:
        preprocess("coco", d, big, tmp_path / "out_big", shard_size=2, engine="local", log=lambda _: None)
    with pytest.raises(DatasetError) as loader:
        read_coco(big, d)
    found = [[(i.reason, i.ann_id) for i in e.value.issues] for e in (ours, loader)]
    assert found == [[("bad_bbox", 100)]] * 2
    # where it does not apply, the annotations are decoded as without it
    odd = {"entry": text.replace('"annotations": [', '"annotations": [5, ', 1),
           "nan": text.replace('"bbox": [2, 2, 18, 16]', '"bbox": [2, NaN, 18, 16]', 1)}  # fmt: skip
    for name, body in odd.items():
        (tmp_path / f"{name}.json").write_text(body)
        got, standard = read_json(tmp_path / f"{name}.json", lazy_annotations=True)
        assert not holds_refs(got["annotations"]) and standard == (name == "entry")
        assert repr(got) == repr(json.loads(body))
    latin = tmp_path / "latin_annotation.json"  # msgspec does not check strings it skips: read_json does
    body = text.replace('"iscrowd": 0', '"note": "cafX", "iscrowd": 0', 1).encode()
    latin.write_bytes(body.replace(b"cafX", b"caf\xe9"))
    with pytest.raises(DatasetError, match=r"latin_annotation.json: byte \d+: not UTF-8 text"):
        read_json(latin, lazy_annotations=True)


def test_collector_skips_alive_objects_and_restores_them():
    import gc

    from diffusioninst.data.validation import collector_skips_alive_objects

    if gc.get_freeze_count():
        pytest.skip("objects are frozen already in this process")
    alive = [[k] for k in range(1000)]
    with collector_skips_alive_objects():
        assert gc.get_freeze_count() >= len(alive)  # the parsed data the caller holds is left out of collections
        gc.collect()
        assert gc.get_freeze_count() >= len(alive)
    assert gc.get_freeze_count() == 0 and gc.is_tracked(alive[0])
    try:  # someone else's frozen objects stay frozen, before and after
        gc.freeze()
        frozen = gc.get_freeze_count()
        with collector_skips_alive_objects():
            assert gc.get_freeze_count() == frozen
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()


def test_decode_errors_name_the_file():
    from diffusioninst.data.image_io import ImageDecodeError

    with pytest.raises(ImageDecodeError, match="broken.jpg"):
        decode_image(b"\xff\xd8\xff\xe0 not really a jpeg", "broken.jpg")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
    for check in (decode_image, inspect_image):  # a JPEG cut short: its header is fine, its pixels are not
        with pytest.raises(ImageDecodeError, match="cut.jpg"):
            check(buf.getvalue()[: len(buf.getvalue()) // 2], "cut.jpg")


def _full_decode_fails(data: bytes) -> bool:
    """The reference: does PIL's own full decode of ``data`` raise?"""
    try:
        Image.open(io.BytesIO(data)).load()
    except (OSError, SyntaxError, ValueError):
        return True
    return False


@pytest.mark.parametrize("progressive", [False, True])
def test_inspect_image_fails_exactly_when_a_full_decode_fails(progressive, monkeypatch):
    """``inspect_image`` decodes a JPEG at 1/8 scale; on damaged files it must still agree with a full decode:
    cut at every 1/40 of the file and in its last bytes, and with runs of random bytes written over the
    entropy-coded data."""
    from PIL import JpegImagePlugin

    from diffusioninst.data.image_io import ImageDecodeError

    scaled = []
    draft = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(
        JpegImagePlugin.JpegImageFile, "draft", lambda self, mode, size: scaled.append(size) or draft(self, mode, size)
    )
    rng = np.random.default_rng(1)
    img = (rng.integers(0, 255, (120, 160, 3)) // 32 * 32).astype(np.uint8)  # blocky noise: a non-trivial stream
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90, progressive=progressive)
    good = buf.getvalue()
    assert inspect_image(good) == decode_with_info(good)[1] and scaled == [(1, 1)]  # the 1/8-scale decode ran
    cases = [good[: len(good) * k // 40] for k in range(1, 40)] + [good[:-n] for n in (1, 2, 3, 16)]
    for _ in range(60):
        bad, at, n = bytearray(good), int(rng.integers(400, len(good) - 34)), int(rng.choice([1, 4, 32]))
        bad[at : at + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()  # same length, n bytes replaced
        cases.append(bytes(bad))
    failed = 0
    for data in cases:
        if _full_decode_fails(data):
            failed += 1
            with pytest.raises(ImageDecodeError, match="damaged.jpg"):
                inspect_image(data, "damaged.jpg")
        else:
            assert inspect_image(data, "damaged.jpg").height == 120
    assert 30 <= failed < len(cases)  # both kinds of case are there


def test_inspect_image_lets_a_full_decode_decide_when_the_scaled_one_fails(monkeypatch):
    from PIL import JpegImagePlugin

    buf = io.BytesIO()
    Image.fromarray(np.full((16, 24, 3), 200, np.uint8)).save(buf, format="JPEG")

    def failing_draft(self, mode, size):
        raise OSError("scaled decoding not supported")

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", failing_draft)
    info = inspect_image(buf.getvalue())
    assert (info.height, info.width, info.format, info.mode) == (16, 24, "JPEG", "RGB")


@pytest.mark.parametrize(
    "poly",
    [[1, 2.5, 3, 4, 5, 6], [], [1e300, 2e300], [0.0, -0.0], [1, "2", 3], [1, None], [True, 1, 2, 3, 4, 5],
     [1, float("nan")], [float("inf"), 1], [float("-inf"), float("inf")], [1e308, 1e308], [[1, 2]], [1, 2 + 0j],
     [np.float64(1.5), 2], [np.float64("nan"), 2]],
)  # fmt: skip
def test_finite_numbers_agrees_with_the_per_element_rule(poly):
    from diffusioninst.data.validation import finite_numbers

    def rule(v):  # the definition, one element at a time
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    assert finite_numbers(poly) == all(rule(v) for v in poly)
