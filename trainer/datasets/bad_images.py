"""Bad image files during training: skipped, counted, listed, and the run's limit on them.

An image file that is missing, not a decodable image or cut short (``trainer.datasets.common.read_bgr_image``
raises ``ImageFileError``) stops an evaluation (no silent partial score) but not a training run:

- A training data set loads another sample in its place (:func:`load_skipping_bad_images`: the next index,
  wrapping around, so the replacement depends on neither the seed nor the number of loader processes) and
  records the file in the sample under :data:`SAMPLE_KEY`, as JSON text (any collate function passes a
  string on).
- DataLoader workers are other processes: :class:`CollateBadImages`, around the family's collate function,
  lifts the records out of the samples into the batch, so they reach the training process with the batch.
- The training loop's :class:`BadImageTracker` counts the distinct files met per epoch over every Ray Train
  worker (the metric ``data/bad_images``), keeps the run's list (written as :data:`BAD_IMAGES_FILE` beside
  the checkpoint, which the orchestrator logs as an artifact, and kept in the checkpoint across a resume) and
  fails the run with :class:`TooManyBadImagesError` as soon as more than ``data.max_bad_images`` distinct
  files have been met (0: at the first).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

from torch.utils.data import default_collate

from trainer.datasets.annotations import DatasetError
from trainer.datasets.common import ImageFileError

SAMPLE_KEY = "bad_images"  # in a training sample (JSON text) and in a batch (list of [path, problem])
BAD_IMAGES_FILE = "bad_images.txt"  # the run's list, one "path<TAB>problem" line per file
NAMED_IN_ERRORS = 5

T = TypeVar("T")


class TooManyBadImagesError(DatasetError):
    """More bad image files than ``data.max_bad_images`` (or no readable image at all) in training."""


def load_skipping_bad_images(
    load: Callable[[int], T],
    index: int,
    num_samples: int,
    image_path: Callable[[int], str],
    known_bad: dict[str, str],
    met: dict[str, str],
    source: str,
) -> tuple[T, int]:
    """``(load(i), i)`` for the first ``i`` of ``index, index + 1, ...`` (modulo ``num_samples``) whose image
    is readable.

    ``image_path(i)``: sample i's image file. ``known_bad``: this process's files found bad so far (path ->
    problem; skipped without reading them again). ``met``: receives the bad files this call met. ``source``
    names the data set in the error raised when no sample's image is readable.
    """
    for step in range(num_samples):
        candidate = (index + step) % num_samples
        path = image_path(candidate)
        if path in known_bad:
            met[path] = known_bad[path]
            continue
        try:
            return load(candidate), candidate
        except ImageFileError as error:
            bad = error.path or path
            known_bad[bad] = met[bad] = error.problem or str(error)
    raise TooManyBadImagesError(f"{source}: no readable image among its {num_samples} samples: {_named(met)}")


def encode_met(met: dict[str, str]) -> str:
    """A sample's record of the bad files it met (JSON text; empty when none)."""
    return json.dumps(sorted(met.items())) if met else ""


class CollateBadImages:
    """The family's collate function (None: PyTorch's default) with the samples' :data:`SAMPLE_KEY` records
    lifted into the batch as one list of ``[path, problem]``; batches without any stay as they were."""

    def __init__(self, collate: Callable | None) -> None:
        self.collate = default_collate if collate is None else collate

    def __call__(self, samples: list):
        if not samples or not isinstance(samples[0], dict) or SAMPLE_KEY not in samples[0]:
            return self.collate(samples)
        met: dict[str, str] = {}
        stripped = []
        for sample in samples:
            sample = dict(sample)
            text = sample.pop(SAMPLE_KEY, "")
            if text:
                met.update((path, problem) for path, problem in json.loads(text))
            stripped.append(sample)
        batch = self.collate(stripped)
        if met:
            batch[SAMPLE_KEY] = sorted([path, problem] for path, problem in met.items())
        return batch


def _named(files: dict[str, str]) -> str:
    shown = sorted(files.items())[:NAMED_IN_ERRORS]
    text = "; ".join(f"{path} ({problem})" for path, problem in shown)
    return text + ("; ..." if len(files) > len(shown) else "")


class BadImageTracker:
    """The bad image files one training worker has met: this epoch's and the run's (path -> problem).

    ``limit``: ``data.max_bad_images``. ``seen``: the run's list so far (a checkpoint's :meth:`state`).
    ``directory``: where :data:`BAD_IMAGES_FILE` is written before the run fails (the run's output directory
    on rank 0; None elsewhere).
    """

    def __init__(
        self, limit: int, seen: Iterable[Sequence[str]] = (), directory: str | Path | None = None
    ) -> None:
        self.limit = int(limit)
        self.run: dict[str, str] = {str(path): str(problem) for path, problem in seen}
        self.epoch: dict[str, str] = {}
        self.directory = directory

    def add(self, entries: Iterable[Sequence[str]]) -> None:
        """A batch's records; fails as soon as this worker alone has met more files than the limit."""
        for path, problem in entries:
            self.epoch[path] = problem
            self.run.setdefault(path, problem)
        self._check()

    def end_epoch(self, gather: Callable[[list], list[list]] | None = None) -> int:
        """Distinct bad files of the epoch over every worker (``gather``: an all-gather of one object across
        the workers; None alone); adds them to the run's list, checks the limit, starts the next epoch."""
        parts = [sorted(self.epoch.items())] if gather is None else gather(sorted(self.epoch.items()))
        epoch = {path: problem for part in parts for path, problem in part}
        for path, problem in epoch.items():
            self.run.setdefault(path, problem)
        self.epoch = {}
        self._check()
        return len(epoch)

    def _check(self) -> None:
        if len(self.run) <= self.limit:
            return
        where = ""
        if self.directory is not None:
            self.write(self.directory)
            where = f"; all of them in {Path(self.directory) / BAD_IMAGES_FILE}"
        raise TooManyBadImagesError(
            f"training met {len(self.run)} bad image file(s) (missing, undecodable or truncated), more than "
            f"data.max_bad_images={self.limit}: {_named(self.run)}{where}. Replace or remove them (`fowkal "
            "data check` lists every one), or raise data.max_bad_images to train past them"
        )

    def state(self) -> list[list[str]]:
        """The run's list as ``[[path, problem], ...]`` (sorted), for a checkpoint."""
        return [[path, problem] for path, problem in sorted(self.run.items())]

    def write(self, directory: str | Path) -> list[str]:
        """Write the run's list as :data:`BAD_IMAGES_FILE` into ``directory`` when it is not empty; returns
        the names written."""
        if not self.run:
            return []
        lines = "".join(f"{path}\t{problem}\n" for path, problem in sorted(self.run.items()))
        (Path(directory) / BAD_IMAGES_FILE).write_text(lines)
        return [BAD_IMAGES_FILE]


__all__ = [
    "BAD_IMAGES_FILE",
    "BadImageTracker",
    "CollateBadImages",
    "SAMPLE_KEY",
    "TooManyBadImagesError",
    "encode_met",
    "load_skipping_bad_images",
]
