"""The preprocessing driver's serial part at COCO scale: the work that no number of shard tasks splits.

Builds a COCO-sized annotation file (default 118,287 images, as COCO train2017) by repeating the annotations of
a 600-image synthetic split under new image and annotation ids (every image entry names one of the 600 files),
then runs ``diffusioninst.data.preprocess`` with its shard pass replaced by one that returns the markers of a
clean pass without touching the images. Two scenarios: ``clean`` (nothing to skip: the GT file is a copy of the
source) and ``one_skipped`` (the same file plus one annotation of an unknown image, ``--on-bad-record skip``:
the GT file is the parsed file re-encoded without it). What is timed is the driver alone: hashing and parsing
the JSON, the whole-file checks, the shard inputs, merging the markers, the GT file and the manifest; and,
separately, packing the shard inputs (what the Ray engine adds before its pass). For reference it also times
the standard library's parse of the same file and the one-pass checks (``per_annotation=True``: what the driver
ran before each annotation's own checks moved into the shard tasks).

Shard tasks take about 2 ms of CPU per image here (``docs/data.md``), so with C CPUs the pass takes about
``images * 2 ms / C``; past the C where that equals the driver's time, more CPUs barely shorten a run.
Writes JSON:

    python benchmarks/preprocess_driver.py --out benchmarks/results/preprocess_driver.json
"""

from __future__ import annotations

import argparse
import functools
import json
import pickle
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_throughput import bench_config
from host_info import cpu_model

import diffusioninst.data.preprocess as P
from diffusioninst.data.loaders import ensure_dataset
from diffusioninst.data.validation import check_annotations, cyclic_gc_paused, load_json

# the driver's phases, as the functions preprocess calls (the parse was load_json before read_json existed)
PARSE = "read_json" if hasattr(P, "read_json") else "load_json"
PHASES = ("sha256_file", PARSE, "check_annotations", "apply_skips", "_parts", "_staged", "_publish")


def replicate(src: Path, num_images: int, dst: Path, unknown_image: bool = False) -> dict[str, int]:
    """Write ``dst``: ``src``'s images and annotations repeated under new ids up to ``num_images`` images
    (``unknown_image``: plus one annotation of an image id that ``images`` does not declare)."""
    data = json.loads(src.read_text())
    step_img = max(i["id"] for i in data["images"])
    step_ann = max(a["id"] for a in data["annotations"])
    anns_of: dict[int, list[dict]] = {}
    for a in data["annotations"]:
        anns_of.setdefault(a["image_id"], []).append(a)
    images, annotations = [], []
    for k in range(num_images):
        r, img = divmod(k, len(data["images"]))
        img = data["images"][img]
        images.append({**img, "id": img["id"] + r * step_img})
        annotations += [
            {**a, "id": a["id"] + r * step_ann, "image_id": a["image_id"] + r * step_img} for a in anns_of[img["id"]]
        ]
    if unknown_image:
        annotations.append({**annotations[0], "id": max(a["id"] for a in annotations) + 1, "image_id": -1})
    dst.write_text(json.dumps({**data, "images": images, "annotations": annotations}))
    return {"images": len(images), "annotations": len(annotations), "json_mb": round(dst.stat().st_size / 2**20, 1)}


def clean_pass(pickle_seconds: list[float]):
    """A stand-in for the shard pass: the markers of a pass that found nothing wrong (no image is read), with
    empty shard files staged so the driver can publish them. Records how long packing the tasks' inputs takes
    (``pack_part``, pickle before it existed: the Ray engine does that on the driver; the local engine does not)."""

    def run(tasks: list[dict], kwargs: dict, *_args) -> dict[int, dict]:
        pack = getattr(P, "pack_part", pickle.dumps)  # what _run_ray does with each shard's input
        t = time.perf_counter()
        for task in tasks:
            pack(task["part"])
        pickle_seconds.append(time.perf_counter() - t)
        staging, markers = Path(kwargs["staging"]), {}
        for task in tasks:
            name = f"part-{task['shard']:05d}.parquet"
            (staging / name).write_bytes(b"")
            imgs, part = task["part"]["images"], task["part"]
            # the annotations, or their text (what the driver hands the tasks since it decodes only their ids)
            anns = (
                part["annotations"]
                if "annotations" in part
                else msgspec.json.decode(part["annotations_json"], type=list[msgspec.Raw])
            )
            markers[task["shard"]] = {
                "file": name,
                "fingerprint": task["fingerprint"],
                "images": [[img["id"], "0" * 64, []] for img in imgs],
                "annotations": [],
                "written": True,
                "rows": len(imgs),
                "instances": len(anns),
                "crowd": 0,
                "reencoded": 0,
                "label_images": {"0": len(imgs)},
            }
        return markers

    return run


def driver_run(annotations: Path, images: Path, out: Path, shard_size: int, policy: str = "error") -> dict[str, float]:
    """One ``preprocess`` call with the pass stubbed out; seconds per driver phase, the stub excluded."""
    times: dict[str, float] = dict.fromkeys(PHASES, 0.0)
    pickled: list[float] = []
    originals = {name: getattr(P, name) for name in (*PHASES, "_run_local")}

    def timed(name):
        @functools.wraps(originals[name])
        def call(*args, **kwargs):
            t = time.perf_counter()
            try:
                return originals[name](*args, **kwargs)
            finally:
                times[name] += time.perf_counter() - t

        return call

    stub_time: list[float] = []
    stub = clean_pass(pickled)

    def timed_stub(*args):
        t = time.perf_counter()
        try:
            return stub(*args)
        finally:
            stub_time.append(time.perf_counter() - t)

    for name in PHASES:
        setattr(P, name, timed(name))
    P._run_local = timed_stub
    shutil.rmtree(out, ignore_errors=True)
    try:
        t = time.perf_counter()
        P.preprocess(
            "coco", images, annotations, out, policy, engine="local", shard_size=shard_size, log=lambda _: None
        )
        total = time.perf_counter() - t
    finally:
        for name, fn in originals.items():
            setattr(P, name, fn)
    times["driver_total"] = total - stub_time[0]
    times["other"] = times["driver_total"] - sum(times[k] for k in PHASES)
    times["ray_pickle_parts"] = pickled[0]
    times["parse_json"] = times.pop(PARSE)
    return {k: round(v, 3) for k, v in times.items()}


def reference_checks(annotations: Path) -> dict[str, float]:
    """The standard library's parse and the one-pass checks, for comparison."""
    with cyclic_gc_paused():
        t = time.perf_counter()
        json.loads(annotations.read_bytes().decode())
        stdlib = time.perf_counter() - t
        data = load_json(annotations)
        t = time.perf_counter()
        check_annotations(data, str(annotations), per_annotation=True)
        one_pass = time.perf_counter() - t
        t = time.perf_counter()
        check_annotations(data, str(annotations), per_annotation=False)
        whole_file = time.perf_counter() - t
    return {
        "stdlib_json_parse": round(stdlib, 3),
        "checks_one_pass": round(one_pass, 3),
        "checks_whole_file_only": round(whole_file, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=118287, help="images in the generated file (COCO train2017)")
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--root", default=None, help="synthetic cache folder (default: a temporary folder)")
    parser.add_argument("--out", default="benchmarks/results/preprocess_driver.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ensure_dataset(bench_config(Path(args.root or tmp), 600))
        images, scenarios = Path(cfg.data.train.images), {}
        for name, policy in (("clean", "error"), ("one_skipped", "skip")):
            big = Path(tmp) / f"instances_{name}.json"
            size = replicate(Path(cfg.data.train.annotations), args.images, big, unknown_image=policy == "skip")
            print(f"{name}: generated {size}", flush=True)
            runs = []
            for r in range(args.runs):
                runs.append(driver_run(big, images, Path(tmp) / "out", args.shard_size, policy))
                print(f"{name} run {r}: {runs[-1]}", flush=True)
            median = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
            scenarios[name] = {"file": size, "policy": policy, "runs": runs, "median_s": median}
        reference = reference_checks(Path(tmp) / "instances_clean.json")
    clean = scenarios["clean"]
    result = {
        "cpu_model": cpu_model(),
        "file": clean["file"],
        "shard_size": args.shard_size,
        "runs": clean["runs"],
        "median_s": clean["median_s"],
        "driver_us_per_image": round(1e6 * clean["median_s"]["driver_total"] / clean["file"]["images"], 1),
        "one_skipped": scenarios["one_skipped"],
        "reference_s": reference,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
