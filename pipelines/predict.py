"""Run a trained model on images: PNG overlays (masks, boxes, labels, scores) and COCO-format results JSON.

Examples:
  python pipelines/predict.py --checkpoint runs/demo/checkpoint_0001000 --input photo.jpg --output preds/
  python pipelines/predict.py --checkpoint model_final.pt --input images/ --output preds/ --batch-size 4
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusioninst.config import ExperimentConfig
from diffusioninst.config.cli import make_parser, resolve

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def build_parser():
    parser = make_parser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder, weights file, or official .pth/.pkl")
    parser.add_argument("--input", required=True, help="an image file or a folder of images")
    parser.add_argument("--output", required=True, help="folder for overlays and predictions.json")
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward (default 4)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: sampler.steps)")
    parser.add_argument("--score-threshold", type=float, default=0.3, help="min score drawn on overlays (0.3)")
    parser.add_argument("--min-score", type=float, default=0.05, help="min score written to the JSON (0.05)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
    parser.add_argument("--seed", type=int, default=0, help="sampler seed (default 0)")
    return parser


def list_images(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    raise FileNotFoundError(f"--input {path}: no such file or folder")


def main(argv: list[str] | None = None) -> int:
    from diffusioninst.engine.predictor import find_config

    args, cfg = resolve(build_parser(), ExperimentConfig, argv, config_from=lambda a: find_config(a.checkpoint))

    import torch

    from diffusioninst.data.image_io import ImageDecodeError, read_image
    from diffusioninst.engine.checkpoint import CheckpointError
    from diffusioninst.engine.host import keep_freed_memory
    from diffusioninst.engine.predictor import Predictor, load_model
    from diffusioninst.engine.visualize import draw_overlay
    from diffusioninst.evaluation import instances_to_coco_results

    keep_freed_memory(cfg.host.keep_freed_memory)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    try:
        files = list_images(Path(args.input))
        if not files:
            raise FileNotFoundError(f"--input {args.input}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        model = load_model(cfg, args.checkpoint, device)
    except (FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    class_names = cfg_class_names(cfg)
    predictor = Predictor(cfg, model, device, seed=args.seed)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    records, skipped, t0 = [], [], time.perf_counter()
    for start in range(0, len(files), args.batch_size):
        chunk, images = [], []
        for f in files[start : start + args.batch_size]:
            try:
                images.append(read_image(f))
                chunk.append(f)
            except (ImageDecodeError, FileNotFoundError) as e:
                skipped.append(f"{f}: {e}")
                print(f"[predict] skipped {f}: {e}", file=sys.stderr)
        if not images:
            continue
        results = predictor(images, steps=args.steps, first_index=start)
        for k, (f, img, res) in enumerate(zip(chunk, images, results)):
            draw_overlay(img, res, class_names, args.score_threshold).save(out / f"{f.stem}.png")
            keep = res["scores"] >= args.min_score
            res = {key: v[keep] for key, v in res.items()}
            for r in instances_to_coco_results(start + k, res, list(range(cfg.model.head.num_classes))):
                records.append(
                    {"file_name": f.name, **r, "category_name": class_names[r["category_id"]] if class_names else None}
                )
        print(f"[predict] {min(start + args.batch_size, len(files))}/{len(files)} images", flush=True)
    (out / "predictions.json").write_text(json.dumps(records))
    dt = time.perf_counter() - t0
    print(f"{len(files) - len(skipped)} images in {dt:.1f} s; overlays and predictions.json in {out.resolve()}")
    if skipped:
        print(f"skipped {len(skipped)} unreadable image(s):\n  " + "\n  ".join(skipped), file=sys.stderr)
    return 0 if not skipped else 1


def cfg_class_names(cfg: ExperimentConfig) -> list[str]:
    """Class names from the dataset the model was trained on, when it is available here."""
    from diffusioninst.data import DatasetError, load_split

    try:
        return list(load_split(cfg, "val", check_files="none").meta.class_names)
    except (DatasetError, FileNotFoundError, ValueError):
        return []


if __name__ == "__main__":
    raise SystemExit(main())
