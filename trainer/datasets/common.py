"""What every family's data set shares: its augmentation generator (per loader process, seeded from
torch, checkpointable for exact resume), the one directory listing per image directory, and OpenCV set up
for DataLoader workers."""

from __future__ import annotations

import json
import os

import cv2
import numpy as np
import torch

from trainer.datasets.annotations import DatasetError

# OpenCV's own thread pool does not survive fork(): a DataLoader worker forked while the parent's pool
# exists deadlocks on its first cv2 call (seen here with cv2.setNumThreads in a worker). Parallelism comes
# from DataLoader workers, so OpenCV runs single-threaded in every process, as MMEngine also sets it.
cv2.setNumThreads(0)


_JPEG_END = b"\xff\xd9"
_PNG_END = b"IEND\xaeB`\x82"
_TAIL_BYTES = 64


def truncation_problem(path: str) -> str | None:
    """Why the JPEG or PNG file at ``path`` is cut short, or None. OpenCV decodes a truncated file without
    an error (the missing rows come out grey), so the end marker is checked first (the last bytes, cheap);
    a file that does not end with it (data appended after the marker, which some cameras write) is decoded
    strictly by Pillow, which raises on a premature end. Other formats: None (OpenCV's decode decides)."""
    with open(path, "rb") as handle:
        head = handle.read(8)
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - _TAIL_BYTES))
        tail = handle.read().rstrip(b"\x00\r\n\t ")
    if head.startswith(b"\xff\xd8"):
        if tail.endswith(_JPEG_END):
            return None
    elif head.startswith(b"\x89PNG\r\n\x1a\n"):
        if tail.endswith(_PNG_END):
            return None
    else:
        return None
    from PIL import Image, ImageFile

    if ImageFile.LOAD_TRUNCATED_IMAGES:  # a process-wide Pillow switch someone else may have set
        return "truncated (no end marker)"
    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, SyntaxError, ValueError) as err:
        return f"truncated ({err})"
    return None


class ImageFileError(DatasetError):
    """An image file that is missing, not a decodable image or cut short: ``path`` and ``problem`` (what
    ``trainer.datasets.bad_images`` records when training skips it)."""

    # The message alone constructs one too: a DataLoader worker re-raises an error as ``type(error)(text)``.
    def __init__(self, message: str, path: str | None = None, problem: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.problem = problem

    def __reduce__(self):
        return type(self), (str(self), self.path, self.problem)


def read_bgr_image(path: str, ids: str, check_truncation: bool = True) -> np.ndarray:
    """The BGR uint8 image at ``path``; ``ImageFileError`` (a ``DatasetError``) naming the file and ``ids``
    (e.g. ``image_id=1``) when it is missing, not a decodable image, or (``check_truncation``) a JPEG/PNG cut
    short."""
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        reason = "missing" if not os.path.isfile(path) else "unreadable (not a decodable image)"
        raise ImageFileError(f"{path}: image file {reason} ({ids})", path, reason)
    if check_truncation:
        problem = truncation_problem(path)
        if problem is not None:
            raise ImageFileError(f"{path}: image file {problem} ({ids})", path, problem)
    return image


def regular_files(directory: str) -> set[str]:
    """Names of the files in ``directory`` (symlinks followed, as ``os.path.isfile``); empty if absent."""
    try:
        with os.scandir(directory) as entries:
            return {
                entry.name
                for entry in entries
                # d_type answers for plain entries; only symlinks cost a stat.
                if (entry.is_file() if entry.is_symlink() else entry.is_file(follow_symlinks=False))
            }
    except (FileNotFoundError, NotADirectoryError):
        return set()


class AugmentationGenerator:
    """A data set's augmentation randomness: a NumPy generator seeded from ``get_worker_info().seed`` in a
    DataLoader worker (different per worker and per epoch) or, in the main process, from torch's global
    generator (reproducible with ``torch.manual_seed``). Names its data set by ``self.ann_file``."""

    ann_file: str
    _rng: np.random.Generator | None = None
    _rng_key: object = None

    def _generator(self) -> np.random.Generator:
        """Per-process augmentation generator, reseeded when the worker (or epoch's worker seed) changes."""
        info = torch.utils.data.get_worker_info()
        key = ("worker", info.seed) if info is not None else ("main", os.getpid())
        if self._rng is None or self._rng_key != key:
            if info is not None:
                seed = info.seed
            else:
                seed = int(torch.randint(0, 2**62, (1,)).item())
            self._rng = np.random.default_rng(seed)
            self._rng_key = key
        return self._rng

    def generator_state(self) -> str | None:
        """The main-process augmentation generator's state as JSON text (a checkpoint keeps it so a resumed
        ``loader_workers=0`` run draws the augmentations an uninterrupted one would), or None when this
        process has not drawn from it (loader workers reseed per epoch from torch's generator instead)."""
        if self._rng is None or self._rng_key != ("main", os.getpid()):
            return None
        return json.dumps(self._rng.bit_generator.state)

    def restore_generator_state(self, state: str) -> None:
        """Continue the main-process generator from :meth:`generator_state`'s text."""
        try:
            values = json.loads(state)
            rng = np.random.default_rng()
            rng.bit_generator.state = values
        except (TypeError, ValueError, KeyError) as err:
            raise ValueError(f"{self.ann_file}: unreadable augmentation generator state: {err}") from err
        self._rng, self._rng_key = rng, ("main", os.getpid())


__all__ = ["AugmentationGenerator", "ImageFileError", "read_bgr_image", "regular_files", "truncation_problem"]
