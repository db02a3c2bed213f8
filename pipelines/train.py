"""Train DiffusionInst on Ray Train (placeholder until the training issue lands)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusioninst.config import ExperimentConfig
from diffusioninst.config.cli import make_parser, resolve


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__, default_config="experiments/demo.yaml")
    _, cfg = resolve(parser, ExperimentConfig, argv)
    print(cfg.name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
