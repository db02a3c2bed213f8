"""The command-line style shared by every entry point in ``pipelines/``.

Every pipeline accepts ``--config FILE`` and ``--set KEY=VALUE`` (repeatable), plus ``--print-config``
(print the resolved config and exit) and ``--list-keys`` (every config key with its type, default and
meaning). Config errors are printed as one list and exit with status 2 before any work starts.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from diffusioninst.config.loader import ConfigError, describe_keys, load_config, to_yaml

T = TypeVar("T")

EPILOG = """\
config overrides:
  --set takes dotted keys of the config schema; values are YAML, e.g.
    --set model.head.num_proposals=300 --set eval.steps=[1,4] --set model.backbone.weights=null
  Run with --list-keys to see every key, its type, default and allowed range.
"""


def make_parser(
    description: str, default_config: str | None = None, config_required: bool = False
) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with the shared ``--config/--set/--print-config/--list-keys`` flags."""
    parser = argparse.ArgumentParser(
        description=description, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config",
        "-c",
        default=default_config,
        required=config_required and default_config is None,
        help="experiment YAML (may use _base_ inheritance)"
        + (f"; default: {default_config}" if default_config else ""),
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        nargs="+",
        help="override a config value with a dotted key (repeatable)",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--list-keys", action="store_true", help="list every config key with its meaning and exit")
    return parser


def resolve(
    parser: argparse.ArgumentParser,
    cls: type[T],
    argv: list[str] | None = None,
    config_from: Callable[[argparse.Namespace], str | Path | None] | None = None,
) -> tuple[argparse.Namespace, T]:
    """Parse ``argv`` and load/validate the config; exits with status 2 and a clear list on config errors.

    ``config_from(args)`` supplies the config file when ``--config`` is not given (e.g. the ``config.yaml``
    saved with a checkpoint).
    """
    args = parser.parse_args(argv)
    if args.config is None and config_from is not None and not args.list_keys:
        found = config_from(args)
        args.config = str(found) if found is not None else None
    if args.list_keys:
        for key, tp, default, help_text in describe_keys(cls):
            print(f"{key:<48} {tp:<28} default={default!r}\n    {help_text}")
        raise SystemExit(0)
    overrides = [item for group in args.overrides for item in group]
    if args.config is not None and not Path(args.config).is_file():
        parser.exit(2, f"error: --config {args.config}: file not found\n")
    try:
        cfg = load_config(cls, args.config, overrides)
    except ConfigError as e:
        parser.exit(2, f"error: {e}\n")
    if args.print_config:
        sys.stdout.write(to_yaml(cfg))
        raise SystemExit(0)
    return args, cfg
