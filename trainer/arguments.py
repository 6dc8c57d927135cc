"""Command-line arguments shared by ``fowkal train`` and ``python -m trainer`` (light: no torch import)."""

from __future__ import annotations

import argparse


def add_config_arguments(
    parser: argparse.ArgumentParser, help_config: str = "YAML config (see configs/)"
) -> None:
    """``--config FILE`` and repeatable ``--set KEY=VALUE`` (``args.overrides``), for ``load_config``."""
    parser.add_argument("--config", required=True, help=help_config)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config entry, e.g. --set loss.variant=mse --set epochs=2 (value parsed as YAML)",
    )
