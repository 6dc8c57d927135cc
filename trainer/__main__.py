"""``python -m trainer --config configs/smoke.yaml [--set key=value ...]``: train without Ray or MLflow.

The plain way into the training loop, for debugging a loss or a pipeline change on a laptop: the same
``train_loop_per_worker`` that Ray Train runs, in this process. It writes ``<output_dir>/checkpoints/``
(``latest.pt``, ``best.pt``), ``metrics.jsonl`` and ``kaf_history.npy``, prints one line per epoch, and
resumes from ``latest.pt`` when run again with the same ``output_dir`` (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from trainer.arguments import add_config_arguments
from trainer.config import ConfigError, config_to_dict, load_config, resolve_paths


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__.split("\n\n")[0])
    add_config_arguments(parser)
    parser.add_argument(
        "--fresh", action="store_true", help="delete <output_dir>/checkpoints first instead of resuming"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = resolve_paths(load_config(args.config, args.overrides))
    except ConfigError as err:
        print(f"python -m trainer: {err}", file=sys.stderr)
        return 2
    if args.fresh:
        shutil.rmtree(Path(config.output_dir) / "checkpoints", ignore_errors=True)
    from trainer.loop import train_loop_per_worker

    try:
        train_loop_per_worker(config_to_dict(config))
    except KeyboardInterrupt:
        print("python -m trainer: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    print(f"outputs in {config.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
