"""Data pipeline throughput: preprocessing (Ray Data) and training ingest (decode + augment + collate).

Generates a COCO-like synthetic split (default 600 images at 480x640, the official augmentation recipe
resizes them to a 480..800 shortest edge), then measures images/s of

* preprocessing (600 and 2400 images by default): ``diffusioninst.data.preprocess`` in one process without
  Ray (``engine="local"``: the plain loop, doing the same work) vs the same on a local Ray with 1 and 2 CPUs
  (cold = first run, then ``--preprocess-rounds`` warm runs, each between two runs without Ray); also a minimal loop
  (decode-check + RLE + Parquet write, without the JSON checks, checksums and manifest) for reference. Every
  run writes into an empty folder, the previous run's output removed off the clock (``--preprocess-output
  existing``: every run replaces it instead, and deleting it is timed too);
* training ingest: a plain single-process loop vs the local torch DataLoader (``data.decode_workers`` = 1, 2)
  vs Ray Data (Parquet shards -> the shards ``PartitionedTrainConfig`` hands to Ray Train workers ->
  ``iter_train_batches``, collating inline like the plain loop, and for 1 consumer also one batch ahead in
  its background thread, in 1 or 2 consumer processes), with the split cached in Ray's object store
  (``data.ray_cache_mb``, the default for a split this small: each consumer draws its own blocks every
  epoch) and re-read from Parquet every epoch (``streaming_split``).

Every worker runs with one thread (cv2.setNumThreads(1), torch.set_num_threads(1)); the plain loops and the Ray
consumers keep freed memory for reuse, as training processes do (``host.keep_freed_memory``). Every ingest
measurement times the same epochs (1..``--epochs``, after a warm-up epoch 0), and the plain loop (PIL) runs before
and after each cached Ray measurement, whose ratio to it uses the mean of those two runs (the host drifts by
up to 10% within minutes). What two busy processes get from the host against one, at the start and at the end
(``environment.host_two_process_scaling``), bounds every 2-worker ratio on a shared virtual machine. Writes JSON:

    python benchmarks/data_throughput.py --out benchmarks/results/data_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2
import numpy as np
import torch
from host_info import cpu_model, process_cpu, two_process_scaling

from diffusioninst.config import ExperimentConfig, load_config
from diffusioninst.data.preprocess import local_runtime_env
from diffusioninst.engine.host import keep_freed_memory


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def load() -> float:
    return round(os.getloadavg()[0], 2)


def single_thread() -> None:
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def bench_config(root: Path, n: int, workers: int = 0, backend: str = "pil") -> ExperimentConfig:
    return load_config(
        ExperimentConfig,
        None,
        [
            "data.format=synthetic",
            f"data.synthetic.root={root}",
            f"data.synthetic.num_train={n}",
            "data.synthetic.num_val=1",
            "data.synthetic.image_size=[480,640]",
            "data.synthetic.max_object_size=300",
            "data.synthetic.small_fraction=0.4",
            "data.cache_images_mb=0",
            f"data.decode_workers={workers}",
            f"data.augmentation.resize_backend={backend}",
            "solver.ims_per_batch=4",
            "model.head.num_classes=4",
        ],
    )


# ----------------------------------------------------------------------------------------------
# preprocessing


def empty_output(out: Path) -> None:
    """Remove ``out`` (a previous run's output) and wait until the file system has written back and freed it
    (``os.sync``), so that a run timed next starts on an empty folder and a quiet disk."""
    shutil.rmtree(out, ignore_errors=True)
    os.sync()


# what the result files say about the inputs of their timed runs (see warm_inputs)
WARM_INPUTS = "read into the page cache before every timed run"


def warm_inputs(cfg: ExperimentConfig) -> None:
    """Read the train split's annotation file and every image file once, so that a run timed next finds them in
    the page cache. Some hosts page out file pages that were not touched for a while (this box runs DAMON's
    proactive reclaim: file pages idle for about a minute go, up to 128 MB/s), so without this a timed run read a
    varying part of its inputs from disk: in 4 Ray runs over 9600 images, 3-21% of the machine sat idle, its tasks
    blocked in reads. Every engine gets the same warm inputs."""
    Path(cfg.data.train.annotations).read_bytes()
    with os.scandir(cfg.data.train.images) as entries:
        for entry in entries:
            if entry.is_file():
                with open(entry.path, "rb") as f:
                    while f.read(1 << 20):
                        pass


def minimal_preprocess_loop(cfg: ExperimentConfig, out: Path, into_empty: bool = False) -> float:
    """A leaner job than ``preprocess`` in one process: decode-check every image, then encode and write shards
    (no JSON validation, checksums, GT JSON or manifest). Reported for reference; images/s. ``into_empty``: as
    for :func:`_preprocess_rate`."""
    import pyarrow.parquet as pq

    from diffusioninst.data.coco import read_coco
    from diffusioninst.data.preprocess import encode_records
    from diffusioninst.data.validation import check_image_file

    if into_empty:
        empty_output(out)
    warm_inputs(cfg)
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    loaded = read_coco(cfg.data.train.annotations, cfg.data.train.images, check_files="none")
    reencode = set()
    for r in loaded.records:
        issues, info, _ = check_image_file(r.file_name, r.image_id, r.height, r.width, str(r.image_id))
        assert not issues
        if info.needs_reencode:
            reencode.add(r.image_id)
    for k in range(0, len(loaded.records), 100):
        table = encode_records(loaded.records[k : k + 100], reencode)
        pq.write_table(table, out / f"part-{k // 100:05d}.parquet", row_group_size=64)
    return len(loaded.records) / (time.perf_counter() - t)


def _preprocess_rate(
    cfg: ExperimentConfig, out: Path, shard_size: int, engine: str, into_empty: bool = False, warm: bool = True
) -> float:
    """images/s of one ``preprocess`` of ``cfg``'s train split into ``out`` with ``force``. ``into_empty``: the
    previous output is removed first, off the clock (:func:`empty_output`), as for a first run into a new
    folder; otherwise the run replaces it (deleting the previous shards is then part of the run). The inputs are
    read into the page cache first, off the clock (:func:`warm_inputs`), unless ``warm`` is False (the caller did)."""
    from diffusioninst.data.preprocess import preprocess

    if into_empty:
        empty_output(out)
    if warm:
        warm_inputs(cfg)
    t = time.perf_counter()
    preprocess("coco", cfg.data.train.images, cfg.data.train.annotations, out, force=True, shard_size=shard_size,
               log=lambda _: None, engine=engine)  # fmt: skip
    return cfg.data.synthetic.num_train / (time.perf_counter() - t)


def ray_preprocess(
    cfg: ExperimentConfig,
    out: Path,
    cpus: int,
    shard_size: int,
    no_ray: Callable[[], float],
    rounds: int = 3,
    into_empty: bool = False,
) -> dict:
    """``preprocess`` on a fresh local Ray with ``cpus`` CPUs: the first run (workers start, imports), then
    ``rounds`` warm runs, each between two runs of ``no_ray`` (the same work without Ray, in this process while
    Ray idles; images/s). The host drifts by up to 10% within minutes, so the warm runs are compared with the
    runs around them: ``vs_same_work_no_ray`` is the mean warm rate over the mean of those, and
    ``vs_same_work_no_ray_per_run`` each warm run's rate over the mean of the two runs right around it (a single
    run moves by up to 8% either way here, so their median is the steadier figure)."""
    import ray

    ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR", runtime_env=local_runtime_env())
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        cold = _preprocess_rate(cfg, out, shard_size, "ray", into_empty)
        around, warm = [no_ray()], []
        for _ in range(rounds):
            warm.append(_preprocess_rate(cfg, out, shard_size, "ray", into_empty))
            around.append(no_ray())
    finally:
        ray.shutdown()
    per_run = [w / statistics.fmean(around[k : k + 2]) for k, w in enumerate(warm)]
    return {
        "cold": cold,
        "warm_runs": warm,
        "warm": statistics.fmean(warm),
        "no_ray_runs_around": around,
        "vs_same_work_no_ray": statistics.fmean(warm) / statistics.fmean(around),
        "vs_same_work_no_ray_per_run": per_run,
        "median_vs_same_work_no_ray": statistics.median(per_run),
    }


def preprocess_throughput(cfg: ExperimentConfig, work: Path, into_empty: bool = False, rounds: int = 3) -> dict:
    """The same preprocessing (``diffusioninst.data.preprocess``: 25-image shards) in one process without Ray
    (``engine="local"``, the plain loop the goals are stated against) and on Ray with 1 and 2 CPUs, the runs
    without Ray alternating with Ray's warm runs (:func:`ray_preprocess`). The minimal loop, for reference,
    runs twice before and twice after. Everything runs once first to warm up (page cache, imports).
    ``into_empty``: every run writes into an empty folder (:func:`_preprocess_rate`); ``rounds``: warm Ray runs
    per CPU count."""
    n, shard_size = cfg.data.synthetic.num_train, 25
    res: dict = {
        "num_images": n,
        "shard_size": shard_size,
        "output": "empty folder" if into_empty else "replacing the previous run's output",
        "inputs": WARM_INPUTS,
        "load_avg_before": load(),
    }
    local = lambda: _preprocess_rate(cfg, work / "local_shards", shard_size, "local", into_empty)  # noqa: E731
    minimal = lambda: minimal_preprocess_loop(cfg, work / "minimal_shards", into_empty)  # noqa: E731
    local(), minimal()  # warm-up: page cache, imports
    mini = [minimal(), minimal()]
    for cpus in (1, 2):
        res[f"ray_data_{cpus}_cpu"] = ray_preprocess(
            cfg, work / f"shards_{cpus}", cpus, shard_size, local, rounds=rounds, into_empty=into_empty
        )
    mini += [minimal(), minimal()]
    loc = [x for cpus in (1, 2) for x in res[f"ray_data_{cpus}_cpu"]["no_ray_runs_around"]]
    res["same_work_1_process_no_ray"] = {"runs": loc, "mean": statistics.fmean(loc)}
    res["minimal_loop_1_process"] = {"runs": mini, "mean": statistics.fmean(mini)}
    res["load_avg_after"] = load()
    lean = res["minimal_loop_1_process"]["mean"]
    for cpus in (1, 2):
        res[f"ray_{cpus}_cpu_vs_same_work_no_ray"] = res[f"ray_data_{cpus}_cpu"]["vs_same_work_no_ray"]
        res[f"ray_{cpus}_cpu_median_vs_same_work_no_ray"] = res[f"ray_data_{cpus}_cpu"]["median_vs_same_work_no_ray"]
        res[f"ray_{cpus}_cpu_vs_minimal_loop"] = res[f"ray_data_{cpus}_cpu"]["warm"] / lean
    res["scaling_2_vs_1_warm"] = res["ray_data_2_cpu"]["warm"] / res["ray_data_1_cpu"]["warm"]
    return res


# ----------------------------------------------------------------------------------------------
# training ingest


def plain_ingest(cfg: ExperimentConfig, epochs: int = 2) -> dict[str, float]:
    """decode + augment + collate in one process, over JPEG bytes held in memory. Like the Ray consumers
    (``_consume``), epoch 0 warms up and epochs 1..``epochs`` are timed, so both sides draw the same
    augmentations (the drawn scales change the work per epoch by a few percent)."""
    from diffusioninst.data.dataset import collate
    from diffusioninst.data.image_io import decode_image
    from diffusioninst.data.loaders import load_split
    from diffusioninst.data.sampling import augmentation_seed
    from diffusioninst.data.transforms import train_sample

    data = load_split(cfg, "train", check_files="none")
    blobs = [Path(r.file_name).read_bytes() for r in data.records]

    def one_epoch(epoch: int) -> int:  # images collated, in batches of 4 (an incomplete last batch is dropped)
        samples, n = [], 0
        for rec, blob in zip(data.records, blobs):
            rng = np.random.default_rng(augmentation_seed(0, epoch, rec.image_id))
            samples.append(train_sample(decode_image(blob), rec, cfg.data.augmentation, rng))
            if len(samples) == 4:
                collate(samples, 32)
                n, samples = n + 4, []
        return n

    one_epoch(0)
    t, c, f = time.perf_counter(), time.process_time(), minor_faults()
    n = sum(one_epoch(epoch) for epoch in range(1, 1 + epochs))
    return {
        "images_per_s": n / (time.perf_counter() - t),
        "cpu_ms_per_image": 1e3 * (time.process_time() - c) / n,
        "minor_faults_per_image": (minor_faults() - f) / n,
    }


def dataloader_ingest(cfg: ExperimentConfig, batches: int, warmup: int = 5) -> dict[str, float]:
    """Local torch DataLoader; CPU time summed over the worker processes and the receiving main process."""
    from diffusioninst.data.loaders import build_train_loader

    it = iter(build_train_loader(cfg, 0, 1, seed=0))
    for _ in range(warmup):
        next(it)
    pids = [w.pid for w in getattr(it, "_workers", [])]
    cpu0 = sum(process_cpu(p)[1] for p in pids) + time.process_time()
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    wall = time.perf_counter() - t
    cpu = sum(process_cpu(p)[1] for p in pids) + time.process_time() - cpu0
    del it
    return {"images_per_s": batches * 4 / wall, "cpu_ms_per_image": 1e3 * cpu / (batches * 4)}


def _consume(iterator, cfg: ExperimentConfig, consumers: int, epochs: int) -> tuple[float, float, int, float, int]:
    """One consumer (as a Ray Train worker) running the training iterator, ``iter_train_batches``: epoch 0
    warms up, later epochs are timed."""
    from diffusioninst.data.loaders import per_rank_batch_size
    from diffusioninst.data.ray_ingest import iter_train_batches

    single_thread()
    keep_freed_memory(cfg.host.keep_freed_memory)  # as a Train worker does
    warm = (cfg.data.synthetic.num_train // consumers) // per_rank_batch_size(cfg, consumers)  # batches of epoch 0
    start, cpu, n, faults = None, 0.0, 0, 0
    for k, batch in enumerate(iter_train_batches(iterator, cfg, consumers, seed=0, epochs=epochs)):
        if k == warm:
            start, cpu, faults = time.time(), time.process_time(), minor_faults()
        n += len(batch) if k >= warm else 0
    return start, time.time(), n, time.process_time() - cpu, minor_faults() - faults


def ray_ingest(
    cfg: ExperimentConfig,
    shards: Path,
    consumers: int,
    epochs: int = 3,
    cache_mb: int | None = None,
    prefetch_batches: int = 0,
) -> dict[str, float]:
    """Consumers as Ray Train workers; CPU time counts the consumer processes (not Ray's read tasks).
    ``cache_mb``: ``data.ray_cache_mb`` (default: the config's, which caches these shards).
    ``prefetch_batches``: ``data.prefetch_batches``; 0 (default) collates inline, as the plain loop does."""
    import ray

    from diffusioninst.data.ray_ingest import build_ray_dataset
    from diffusioninst.data.ray_partition import PartitionedTrainConfig

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", runtime_env=local_runtime_env())
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        pcfg = bench_config(Path(cfg.data.synthetic.root), cfg.data.synthetic.num_train)
        pcfg.data.format, pcfg.data.train.parquet = "parquet", str(shards)
        pcfg.data.val.parquet = str(shards)
        pcfg.data.prefetch_batches = prefetch_batches
        pcfg.solver.ims_per_batch = 4 * consumers  # batches of 4 per consumer
        if cache_mb is not None:
            pcfg.data.ray_cache_mb = cache_mb
        # the shards exactly as Ray Train makes them for its workers (get_dataset_shard)
        config = PartitionedTrainConfig(seed=pcfg.solver.seed)
        splits = [
            s["train"] for s in config.configure({"train": build_ray_dataset(pcfg, "train")}, consumers, None, None)
        ]
        task = ray.remote(num_cpus=2 / consumers * 0.5)(_consume)  # leave CPU for the Parquet reads
        out = ray.get([task.remote(s, pcfg, consumers, epochs) for s in splits])
    finally:
        ray.shutdown()
    start, end, n = min(o[0] for o in out), max(o[1] for o in out), sum(o[2] for o in out)
    return {
        "images_per_s": n / (end - start),
        "cpu_ms_per_image": 1e3 * sum(o[3] for o in out) / n,
        "minor_faults_per_image": sum(o[4] for o in out) / n,
    }


def ingest_throughput(cfg: ExperimentConfig, work: Path, num_images: int, epochs: int) -> dict:
    """Training ingest: plain loops, the torch DataLoader and Ray Data consumers (cached split, each cached Ray
    run between two plain loops; then the split re-read every epoch)."""
    from diffusioninst.data.loaders import ensure_dataset

    shards = work / "ingest_shards"  # the Parquet split the Ray ingest reads (same bytes on any engine)
    _preprocess_rate(cfg, shards, 25, "local")
    ing: dict = {"load_avg_before": load()}
    for workers in (1, 2):
        ing[f"torch_dataloader_{workers}_workers"] = dataloader_ingest(
            ensure_dataset(bench_config(work, num_images, workers)), batches=100
        )
    plain_cfgs = {backend: ensure_dataset(bench_config(work, num_images, 0, backend)) for backend in ("cv2", "pil")}
    for backend, c in plain_cfgs.items():
        ing[f"plain_loop_1_process_{backend}"] = plain_ingest(c, epochs)
    # the host's speed drifts by up to 10% within minutes: every cached Ray run is bracketed by plain loops (PIL),
    # and its ratio to the plain loop uses the mean of the two runs right before and right after it
    brackets = [ing["plain_loop_1_process_pil"]]
    measured = [
        ("ray_data_1_consumers", 1, 0),
        ("ray_data_2_consumers", 2, 0),
        ("ray_data_1_consumers_prefetch1", 1, 1),
    ]
    for key, consumers, prefetch in measured:  # prefetch 1: one batch ahead in the consumer's background thread
        ing[key] = ray_ingest(cfg, shards, consumers, 1 + epochs, prefetch_batches=prefetch)
        brackets.append(plain_ingest(plain_cfgs["pil"], epochs))
    ing["plain_loop_1_process_pil_between_ray_runs"] = brackets[1:-1]
    ing["plain_loop_1_process_pil_after_ray"] = brackets[-1]
    # the same with the split re-read from Parquet every epoch (what a split over data.ray_cache_mb does)
    for consumers in (1, 2):
        ing[f"ray_data_{consumers}_consumers_reread"] = ray_ingest(cfg, shards, consumers, 1 + epochs, cache_mb=0)
    ing["load_avg_after"] = load()

    def rate(key: str) -> float:
        return ing[key]["images_per_s"]

    ing["dataloader_scaling_2_vs_1"] = rate("torch_dataloader_2_workers") / rate("torch_dataloader_1_workers")
    ing["dataloader_1_vs_plain"] = rate("torch_dataloader_1_workers") / rate("plain_loop_1_process_pil")
    ing["ray_scaling_2_vs_1"] = rate("ray_data_2_consumers") / rate("ray_data_1_consumers")
    for k, (key, _, _) in enumerate(measured):  # against the plain loop right before and right after
        plain = statistics.fmean(b["images_per_s"] for b in brackets[k : k + 2])
        ing[key.replace("ray_data_", "ray_").replace("_consumers", "") + "_vs_plain"] = rate(key) / plain
    ing["ray_reread_scaling_2_vs_1"] = rate("ray_data_2_consumers_reread") / rate("ray_data_1_consumers_reread")
    return ing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=600, help="synthetic 480x640 images (default 600)")
    parser.add_argument("--root", default=None, help="synthetic cache folder (default: a temporary folder)")
    parser.add_argument(
        "--preprocess-images",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[600, 2400],
        help="split sizes the preprocessing is measured at, comma-separated (default 600,2400; Ray's fixed cost "
        "per run weighs less on the larger one)",
    )
    parser.add_argument(
        "--preprocess-output",
        choices=("empty", "existing"),
        default="empty",
        help="empty (default): every preprocessing run writes into an empty folder, the previous output removed "
        "off the clock, as a first run does; existing: every run replaces the previous run's output, so deleting "
        "its shards is timed too (the protocol of the result files before this option)",
    )
    parser.add_argument(
        "--preprocess-rounds",
        type=int,
        default=6,
        help="warm Ray runs per CPU count and split size, each between two runs without Ray (default 6)",
    )
    parser.add_argument("--out", default="benchmarks/results/data_throughput.json")
    parser.add_argument(
        "--only", choices=("preprocess", "ingest"), default=None, help="measure one half only (default: both)"
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=6,
        help="timed epochs per ingest measurement, after one warm-up epoch (plain loops and Ray consumers alike)",
    )
    args = parser.parse_args(argv)
    single_thread()
    keep_freed_memory()  # the plain loops run here, with the host setting the Ray consumers (Train workers) use
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    work = Path(args.root or tempfile.mkdtemp(prefix="data_bench_"))
    from diffusioninst.data.loaders import ensure_dataset

    cfg = ensure_dataset(bench_config(work, args.num_images))
    results: dict = {"num_images": args.num_images, "image_size_hw": [480, 640], "timed_epochs": args.epochs}
    scaling_before = two_process_scaling()  # the most a 2-worker ratio can reach on this host right now

    results["preprocess_images_per_s"] = {}
    for n in args.preprocess_images if args.only != "ingest" else []:
        pcfg = cfg if n == args.num_images else ensure_dataset(bench_config(work, n))
        results["preprocess_images_per_s"][str(n)] = preprocess_throughput(
            pcfg, work / f"pre_{n}", into_empty=args.preprocess_output == "empty", rounds=args.preprocess_rounds
        )

    if args.only != "preprocess":
        results["train_ingest_images_per_s"] = ingest_throughput(cfg, work, args.num_images, args.epochs)
    results["environment"] = {
        "host_two_process_scaling": {"before": scaling_before, "after": two_process_scaling()},
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "opencv": cv2.__version__,
        "recipe": "flip p=0.5; shortest edge 480..800 step 32, max 1333; crop chain p=0.5; resize_backend pil "
        "unless the key says cv2; batch 4; one thread per worker",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
