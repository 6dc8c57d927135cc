"""A checkpoint's heatmaps on an evaluation set, computed once and kept on disk, then decoded many times.

What ``fowkal tune-eval`` sweeps (the flip-test mode, DARK's kernel, the rescoring and OKS-NMS thresholds,
the detection-score threshold) acts after the network: ``build_heatmap_cache`` runs the model once over
every box, on the crop and on its mirror, and stores both heatmaps as the model output them (the mirrored
ones are put back per trial, since that depends on ``eval.flip_mode``). ``HeatmapCache.predictions`` then
selects the boxes of a detection-score threshold and decodes them through ``trainer.topdown.inference``'s one
decoding path (``decode_heatmaps``), batch by batch as ``predict_keypoints`` does, so a trial at a run's
settings gives exactly the numbers of ``fowkal eval`` on it.

Decoding costs more than the evaluation of a trial at val scale (the flip test's average and DARK over
every box), and depends only on the flip mode and the blur kernel: ``HeatmapCache.decoded`` decodes every
box once per (flip mode, kernel), keeps the keypoints in memory and, given a ``memo_dir`` (``fowkal
tune-eval`` gives its sweep directory), on disk for the other trial processes; one pass over the heatmaps of
a flip mode decodes every kernel a sweep can ask for (the average is the costly part, DARK on the patch
around each peak is cheap). A trial then only selects its boxes, rescores, suppresses and scores.

A cache directory holds ``plain.npy`` and ``mirrored.npy`` (``[N, K, H, W]``, memory-mapped when read),
``boxes.npz`` (image ids, crop centres and scales, box scores, OKS-NMS areas) and ``info.json`` (what it was
computed from, and its key). It is written under a temporary name and renamed, so a reader never sees half
of one; a directory whose key differs is rebuilt.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from trainer.checkpoint import LoadedCheckpoint
from trainer.evaluation.cache_files import file_identity, key_digest, locked
from trainer.evaluation.model_eval import build_eval_dataset, select_device, with_progress
from trainer.evaluation.wholebody import WholeBodyEvaluator
from trainer.runtime import autocast_dtype
from trainer.topdown.codec import flip_back_heatmaps
from trainer.topdown.config import EvalConfig
from trainer.topdown.inference import decode_heatmaps, results_from_predictions

# Storage type of the cached heatmaps. float32: the model's own output, so decoding a cached map is
# bit-identical to decoding it live (bench/tune_eval.py measures how far float16 would move the keypoints).
CACHE_DTYPE = np.float32
_BOX_FIELDS = ("image_ids", "center", "scale", "box_scores", "areas")
_FORMAT = 1
# Decoded (flip mode, kernel) pairs an opened cache keeps in memory (45,000 boxes: 72 MB each).
MEMO_ENTRIES = 8


def cache_key(
    loaded: LoadedCheckpoint,
    ann_file,
    image_dir,
    det_file=None,
    det_score_thr: float = 0.0,
    dtype=CACHE_DTYPE,
) -> str:
    """16 hex digits naming what the heatmaps depend on: the checkpoint file, the run's pipeline and model,
    the annotation file, the image directory, the detection file and the lowest detection score kept."""
    config = loaded.config
    payload = {
        "format": _FORMAT,
        "checkpoint": file_identity(loaded.checkpoint_path),
        "backbone": config.model.backbone,
        "pipeline": repr(config.data.pipeline),
        "gt_instances": config.data.gt_instances,
        "ann_file": file_identity(ann_file),
        "image_dir": str(Path(image_dir).resolve()),
        "det_file": file_identity(det_file),
        "det_score_thr": float(det_score_thr) if det_file is not None else None,
        "dtype": np.dtype(dtype).name,
    }
    return key_digest(payload)


@dataclass
class HeatmapCache:
    """An opened cache directory (see the module docstring)."""

    path: Path
    plain: np.ndarray  # [N, K, H, W], memory-mapped
    mirrored: np.ndarray  # [N, K, H, W] as predicted on the mirrored crops, memory-mapped
    image_ids: np.ndarray
    center: np.ndarray
    scale: np.ndarray
    box_scores: np.ndarray
    areas: np.ndarray
    info: dict
    # (flip mode or None without the flip test, kernel) -> (keypoints [N, K, 2], scores [N, K]) of every box
    memo: OrderedDict = field(default_factory=OrderedDict, repr=False, compare=False)

    @property
    def stride(self) -> float:
        return float(self.info["stride"])

    @property
    def min_det_score_thr(self) -> float:
        """The lowest detection-score threshold the cache can answer (its boxes score at least this)."""
        return float(self.info["det_score_thr"]) if self.info["det_file"] is not None else 0.0

    @classmethod
    def open(cls, path: str | os.PathLike) -> HeatmapCache:
        path = Path(path)
        try:
            info = json.loads((path / "info.json").read_text())
            boxes = np.load(path / "boxes.npz")
            plain = np.load(path / "plain.npy", mmap_mode="r")
            mirrored = np.load(path / "mirrored.npy", mmap_mode="r")
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"heatmap cache {str(path)!r} is incomplete or unreadable: {err}") from err
        return cls(path, plain, mirrored, *(boxes[name] for name in _BOX_FIELDS), info=info)

    def select(self, det_score_thr: float) -> np.ndarray:
        """Indices of the boxes a dataset built with ``det_score_thr`` would hold (all for GT boxes)."""
        if self.info["det_file"] is None:
            return np.arange(len(self.image_ids))
        if det_score_thr < self.min_det_score_thr:
            raise ValueError(
                f"data.det_score_thr {det_score_thr} is below the {self.min_det_score_thr} the heatmap cache "
                f"{self.path} was built with (boxes scoring less were not run)"
            )
        return np.flatnonzero(self.box_scores >= np.float32(det_score_thr))

    def decode(
        self, flip_mode: str | None, kernels, batch_size: int = 64
    ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Every box decoded, per kernel of ``kernels``: kernel -> (image keypoints ``[N, K, 2]``, scores
        ``[N, K]``), ``batch_size`` boxes at a time. ``flip_mode`` None: no flip test. The flip-test average
        is computed once per batch for all kernels, then each kernel goes through ``decode_heatmaps`` (the
        one decoding path), so each kernel's keypoints are those of ``predict_keypoints``."""
        kernels = sorted({int(k) for k in kernels})
        num, num_kpts = self.plain.shape[:2]
        out = {
            k: (np.empty((num, num_kpts, 2), np.float32), np.empty((num, num_kpts), np.float32))
            for k in kernels
        }
        for start in range(0, num, batch_size):
            rows = slice(start, start + batch_size)
            maps = torch.from_numpy(np.array(self.plain[rows], dtype=np.float32))
            if flip_mode is not None:
                # decode_heatmaps' 0.5 * (maps + flipped back), once for every kernel; in place (a sum
                # commutes exactly, halving is exact), so without two allocations of the batch's size.
                mirrored = torch.from_numpy(np.array(self.mirrored[rows], dtype=np.float32))
                flipped = flip_back_heatmaps(mirrored, mode=flip_mode, stride=self.stride)
                maps = flipped.add_(maps).mul_(0.5)
            for kernel in kernels:
                keypoints, scores = decode_heatmaps(
                    maps, None, self.center[rows], self.scale[rows], "shift", self.stride, kernel
                )
                out[kernel][0][rows], out[kernel][1][rows] = keypoints, scores
        return out

    def decoded(
        self,
        flip_mode: str,
        blur_kernel: int,
        flip_test: bool = True,
        batch_size: int = 64,
        *,
        kernels=(),
        memo_dir: str | os.PathLike | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Image keypoints ``[N, K, 2]`` and scores ``[N, K]`` of every box for one (flip mode, kernel),
        decoded once: from memory, else from ``memo_dir`` (written by another trial process), else decoded
        now together with the other ``kernels`` of the same flip mode (what a sweep can ask for next), and
        kept in both. A lock file in ``memo_dir`` makes concurrent processes decode a flip mode once."""
        mode = flip_mode if flip_test else None
        key = (mode, int(blur_kernel))
        if key in self.memo:
            self.memo.move_to_end(key)
            return self.memo[key]
        wanted = sorted({int(blur_kernel), *(int(k) for k in kernels)})
        if memo_dir is None:
            decoded = self.decode(mode, wanted, batch_size)
        else:
            memo = Path(memo_dir)
            memo.mkdir(parents=True, exist_ok=True)
            stem = "noflip" if mode is None else f"flip-{mode}"
            with locked(memo / f"{stem}.lock"):
                paths = {k: memo / f"{stem}-k{k}.npz" for k in wanted}
                decoded = {k: _read_decoded(p) for k, p in paths.items() if p.is_file()}
                missing = [k for k in wanted if decoded.get(k) is None]
                if int(blur_kernel) in missing:
                    for k, value in self.decode(mode, missing, batch_size).items():
                        _write_decoded(paths[k], *value)
                        decoded[k] = value
        for kernel, value in decoded.items():
            if value is not None:
                self.memo[(mode, kernel)] = value
        while len(self.memo) > MEMO_ENTRIES:
            self.memo.popitem(last=False)
        return decoded[int(blur_kernel)]

    def predictions(
        self,
        settings: EvalConfig,
        det_score_thr: float = 0.0,
        flip_test: bool = True,
        batch_size: int = 64,
        *,
        kernels=(),
        memo_dir: str | os.PathLike | None = None,
        image_ids=None,
    ) -> dict[str, np.ndarray]:
        """``predict_keypoints``'s output for the boxes of ``det_score_thr``, decoded with ``settings``
        (``flip_mode``, ``blur_kernel``; once per pair, :meth:`decoded`); only the boxes of ``image_ids`` when
        given (a held-out split)."""
        indices = self.select(det_score_thr)
        if image_ids is not None:
            indices = indices[np.isin(self.image_ids[indices], np.asarray(list(image_ids)))]
        keypoints, scores = self.decoded(
            settings.flip_mode,
            settings.blur_kernel,
            flip_test,
            batch_size,
            kernels=kernels,
            memo_dir=memo_dir,
        )
        return {
            "image_ids": self.image_ids[indices],
            "keypoints": keypoints[indices],
            "keypoint_scores": scores[indices],
            "box_scores": self.box_scores[indices].astype(np.float64),
            "areas": self.areas[indices],
        }

    def evaluate(
        self,
        settings: EvalConfig,
        det_score_thr: float,
        evaluator: WholeBodyEvaluator,
        flip_test: bool = True,
        batch_size: int = 64,
        *,
        kernels=(),
        memo_dir: str | os.PathLike | None = None,
        image_ids=None,
    ) -> tuple[dict[str, float], int]:
        """COCO-WholeBody metrics of one setting (decode or the memo, rescoring, OKS-NMS, xtcocotools) and
        the number of boxes it used (those of ``image_ids`` when given)."""
        predictions = self.predictions(
            settings,
            det_score_thr,
            flip_test,
            batch_size,
            kernels=kernels,
            memo_dir=memo_dir,
            image_ids=image_ids,
        )
        results = results_from_predictions(predictions, settings)
        return evaluator.evaluate(results), len(predictions["image_ids"])


def _read_decoded(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        with np.load(path) as data:
            return data["keypoints"], data["scores"]
    except (OSError, ValueError, KeyError):
        return None  # damaged: decoded again


def _write_decoded(path: Path, keypoints: np.ndarray, scores: np.ndarray) -> None:
    scratch = path.with_name(f".{path.stem}-{os.getpid()}.npz")
    np.savez(scratch, keypoints=keypoints, scores=scores)
    os.replace(scratch, path)


@torch.no_grad()
def build_heatmap_cache(
    loaded: LoadedCheckpoint,
    ann_file,
    image_dir,
    cache_root,
    *,
    det_file=None,
    det_score_thr: float = 0.0,
    batch_size: int | None = None,
    workers: int | None = None,
    gpus: int | None = None,
    progress: bool = True,
    dtype=CACHE_DTYPE,
) -> HeatmapCache:
    """Run the model once over the evaluation boxes (crop and mirror) and keep the heatmaps under
    ``cache_root/<cache_key>``; an existing cache of the same key is opened instead.

    ``det_score_thr`` is the lowest detection score a trial may ask for (boxes below it are not run).
    ``batch_size`` / ``workers`` default to the run's ``data.val_batch_size`` / ``data.loader_workers``.
    """
    key = cache_key(loaded, ann_file, image_dir, det_file, det_score_thr, dtype)
    final = Path(cache_root) / key
    if (final / "info.json").is_file():
        try:
            return HeatmapCache.open(final)
        except ValueError:
            shutil.rmtree(final, ignore_errors=True)  # half-removed or damaged: rebuilt below
    config = loaded.config
    dataset = build_eval_dataset(config, ann_file, image_dir, det_file, det_score_thr)
    batch_size = config.data.val_batch_size if batch_size is None else int(batch_size)
    workers = config.data.loader_workers if workers is None else int(workers)
    device, _ = select_device(gpus)
    amp_dtype = autocast_dtype(device, config.amp)
    model = loaded.model.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    width, height = config.data.pipeline.heatmap_size
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=final.parent))
    try:
        plain = mirrored = None
        boxes: dict[str, list] = {name: [] for name in _BOX_FIELDS}
        stride = None
        row = 0
        for batch in with_progress(loader, len(loader), "heatmaps", enabled=progress):
            images = batch["image"].to(device)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                out = model(images)[0].float()
                out_mirrored = model(images.flip(-1))[0].float()
            if plain is None:
                shape = (len(dataset), *out.shape[1:])
                plain = np.lib.format.open_memmap(scratch / "plain.npy", "w+", dtype, shape)
                mirrored = np.lib.format.open_memmap(scratch / "mirrored.npy", "w+", dtype, shape)
                stride = images.shape[-1] / out.shape[-1]
            plain[row : row + len(out)] = out.cpu().numpy()
            mirrored[row : row + len(out)] = out_mirrored.cpu().numpy()
            row += len(out)
            scale = batch["scale"].cpu().numpy()
            boxes["image_ids"].append(np.asarray(batch["image_id"]).reshape(-1))
            boxes["center"].append(batch["center"].cpu().numpy())
            boxes["scale"].append(scale)
            boxes["box_scores"].append(np.asarray(batch["bbox_score"], dtype=np.float64).reshape(-1))
            boxes["areas"].append(scale[:, 0].astype(np.float64) * scale[:, 1])
        if plain is None:  # no boxes: empty arrays of the model's heatmap shape
            from trainer.datasets.keypoints import NUM_KEYPOINTS

            shape = (0, NUM_KEYPOINTS, height, width)
            plain = np.lib.format.open_memmap(scratch / "plain.npy", "w+", dtype, shape)
            mirrored = np.lib.format.open_memmap(scratch / "mirrored.npy", "w+", dtype, shape)
            stride = config.data.pipeline.input_size[0] / width
        plain.flush()
        mirrored.flush()
        del plain, mirrored
        arrays = {
            name: np.concatenate(values) if values else np.zeros((0, 2) if name in ("center", "scale") else 0)
            for name, values in boxes.items()
        }
        np.savez(scratch / "boxes.npz", **arrays)
        info = {
            "key": key,
            "checkpoint": str(loaded.checkpoint_path),
            "ann_file": str(ann_file),
            "image_dir": str(image_dir),
            "det_file": None if det_file is None else str(det_file),
            "det_score_thr": float(det_score_thr),
            "stride": float(stride),
            "shape": list(shape),
            "dtype": np.dtype(dtype).name,
        }
        (scratch / "info.json").write_text(json.dumps(info, indent=1))
        try:
            os.replace(scratch, final)
        except OSError:  # another process finished the same cache first: use that one
            shutil.rmtree(scratch, ignore_errors=True)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return HeatmapCache.open(final)


__all__ = ["CACHE_DTYPE", "HeatmapCache", "build_heatmap_cache", "cache_key"]
