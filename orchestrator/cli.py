"""The ``fowkal`` command line. Each subcommand imports its heavy dependencies lazily."""

from __future__ import annotations

import argparse
import sys


def _cmd_data_synth(args: argparse.Namespace) -> int:
    from trainer.synth import write_synthetic_dataset

    ann_file = write_synthetic_dataset(args.out, num_images=args.images, seed=args.seed)
    print(f"wrote {args.images} images and {ann_file}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fowkal", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="data set utilities")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    synth = data_sub.add_parser("synth", help="generate a synthetic COCO-WholeBody-format data set")
    synth.add_argument("--out", required=True, help="output directory (images/ and annotations.json)")
    synth.add_argument("--images", type=int, default=64, help="number of images")
    synth.add_argument("--seed", type=int, default=0, help="random seed (same seed, same data)")
    synth.set_defaults(func=_cmd_data_synth)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
