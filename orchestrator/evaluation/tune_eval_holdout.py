"""``fowkal tune-eval --holdout F``: tune on part of the evaluation images, check the best settings on the
rest.

Without it a tune-eval picks its best trial and reports its score on the same images, which flatters the best
settings (the maximum of many noisy scores). With it the images of the annotation file are split by image id,
deterministically for a seed (each id's place in the order is the SHA-256 of ``"<seed>:<id>"``, whatever the
file's order or its other images): a fraction F is held out, the trials score only the rest (their annotation
file is the tuned part's, written into the sweep directory, so each trial's numbers are those of ``fowkal
eval`` on that file), and after the sweep the best settings and the defaults are scored once on the held-out
part from the same cache.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from orchestrator.evaluation.tune_eval_inputs import TuneEvalError

TUNED_FILE = "tuned_images.json"
HELD_OUT_FILE = "held_out_images.json"
# Parent-run metric keys: "holdout/<half>/<settings>/<metric>", e.g. holdout/held_out/best/eval/wholebody_AP.
HOLDOUT_PREFIX = "holdout/"


@dataclass
class HoldoutSplit:
    """The two parts of the evaluation images and their annotation files."""

    fraction: float
    tuned_ids: tuple[int, ...]
    held_out_ids: tuple[int, ...]
    tuned_ann: str
    held_out_ann: str


def check_holdout(fraction) -> None:
    """``--holdout`` must be a number strictly between 0 and 1 (None: no held-out part)."""
    if fraction is None:
        return
    ok = isinstance(fraction, int | float) and not isinstance(fraction, bool) and math.isfinite(fraction)
    if not ok or not 0 < fraction < 1:
        raise TuneEvalError(
            f"--holdout must be the fraction of the images held out, a number strictly between 0 and 1 (e.g. "
            f"0.5), got {fraction!r}"
        )


def split_ids(image_ids, fraction: float, seed: int) -> tuple[tuple, tuple]:
    """``(tuned, held out)`` ids, each sorted: the ``round(fraction * n)`` ids first in the seeded order are
    held out (at least one, and at least one is tuned on)."""
    ids = sorted(set(image_ids), key=str)
    if len(ids) < 2:
        raise TuneEvalError(f"--holdout needs at least 2 images in the annotation file, it has {len(ids)}")
    order = sorted(ids, key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
    held = min(max(round(fraction * len(ids)), 1), len(ids) - 1)
    return tuple(sorted(order[held:], key=str)), tuple(sorted(order[:held], key=str))


def write_split(ann_file, fraction: float, seed: int, directory) -> HoldoutSplit:
    """Split the images of ``ann_file`` (``split_ids``) and write each part's annotation file (the same file
    with only that part's images and their annotations) into ``directory``."""
    data = json.loads(Path(ann_file).read_text())
    tuned, held_out = split_ids([image["id"] for image in data.get("images", [])], fraction, seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for ids, name in ((tuned, TUNED_FILE), (held_out, HELD_OUT_FILE)):
        keep = set(ids)
        part = dict(data)
        part["images"] = [image for image in data.get("images", []) if image["id"] in keep]
        part["annotations"] = [a for a in data.get("annotations", []) if a["image_id"] in keep]
        path = directory / name
        path.write_text(json.dumps(part))
        paths.append(str(path))
    return HoldoutSplit(float(fraction), tuned, held_out, *paths)


__all__ = [
    "HELD_OUT_FILE",
    "HOLDOUT_PREFIX",
    "TUNED_FILE",
    "HoldoutSplit",
    "check_holdout",
    "split_ids",
    "write_split",
]
