"""A KAPAO checkpoint's candidates on an evaluation set, computed once per test-time-augmentation mode and
kept on disk, then turned into poses many times (``fowkal tune-eval``).

Everything ``fowkal tune-eval`` sweeps for KAPAO (the six thresholds, fusion, the unfused-keypoint score, the
caps) acts on the candidates (``trainer.kapao.postprocess.Candidates``), not on the head output: the raw
outputs are 165 MB per image at 1280 and K = 133, the candidates above the thresholds a few hundred rows.
``build_candidate_cache`` runs the network once per TTA mode over every image, through
``trainer.kapao.family.batch_candidates`` (what ``fowkal eval`` runs, with the same batches), and keeps per
image the pose and keypoint candidates above the space's lowest ``tau_cp`` / ``tau_ck``, before NMS, sorted by
confidence (ties in anchor order, as NMS would sort them). A trial (``CandidateCache.evaluate``) then runs
``poses_from_candidates`` (the two NMS passes, fusion, scores) on each image's cached rows and scores the
poses with the shared evaluator: the numbers of ``fowkal eval`` at the same settings, bit for bit (on the same
machine and torch thread count: the network's own floats depend on them).

Depth: an image keeps at most ``pose_depth`` pose candidates and ``keypoint_depth`` keypoint candidates
(default: ``NMS_INPUT_CAP``, as many as NMS ever reads, so keypoints are always complete). A trial whose
``tau_cp`` lies below an image's cut (the best pose candidate not kept) is still exact when NMS kept its
``max_poses`` poses (and, with fusion, every candidate above ``tau_fc`` was kept): greedy NMS on the best n
candidates decides them as on all. Otherwise the image's cache ran out and the trial counts it
(``short_images``), so that a too-shallow cache is said, never silently scored.

A cache directory ``<root>/<key>/`` holds ``info.json`` (what it was computed from) and one directory per
TTA mode (``none/``, ``flip/``, ``scales/``) with ``images.npz`` (image ids, letterbox ratios and pads, per
image the row offsets and the cuts) and the candidates' ``.npy`` arrays (memory-mapped when read). A mode is
written under a temporary name and renamed, under a lock, so concurrent builders compute it once and a
reader never sees half of one; a directory whose key differs is another cache.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from trainer.checkpoint import LoadedCheckpoint
from trainer.evaluation.cache_files import file_identity, key_digest, locked
from trainer.kapao.postprocess import (
    NMS_INPUT_CAP,
    TTA_MODES,
    Candidates,
    KapaoEvalConfig,
    poses_from_candidates,
)

# Pose candidates kept per image and TTA mode: K = 133 costs 1 KB a row, so 2000 rows = 2 MB per image at
# most; a trained model has a few hundred above tau_cp = 0.001 (bench/kapao.py's crowd of 20: ~1750).
POSE_DEPTH = 2000
KEYPOINT_DEPTH = NMS_INPUT_CAP
_FORMAT = 1
_POSE_ARRAYS = ("pose_boxes", "pose_scores", "pose_keypoints")
_KP_ARRAYS = ("kp_boxes", "kp_scores", "kp_classes")
FAMILY = "kapao"  # written into info.json: which family's sweep reads the cache


def cache_key(
    loaded: LoadedCheckpoint,
    ann_file,
    image_dir,
    pose_floor: float,
    keypoint_floor: float,
    pose_depth: int = POSE_DEPTH,
    keypoint_depth: int = KEYPOINT_DEPTH,
) -> str:
    """16 hex digits naming what the candidates depend on: the checkpoint file, the model and input size,
    the annotation file, the image directory, the floors and the depths."""
    config = loaded.config
    payload = {
        "format": _FORMAT,
        "checkpoint": file_identity(loaded.checkpoint_path),
        "model": [config.model.size, config.model.keypoints],
        "input_size": config.data.input_size,
        "val_batch_size": config.data.val_batch_size,  # batches change the network's float results
        "ann_file": file_identity(ann_file),
        "image_dir": str(Path(image_dir).resolve()),
        "floors": [float(pose_floor), float(keypoint_floor)],
        "depths": [int(pose_depth), int(keypoint_depth)],
    }
    return key_digest(payload)


@dataclass
class ModeCandidates:
    """One TTA mode's candidates of every image (flat rows; image i's are ``offsets[i]:offsets[i + 1]``)."""

    image_ids: np.ndarray  # [N] int64
    ratios: np.ndarray  # [N] float64
    pads: np.ndarray  # [N, 2] float64
    pose_offsets: np.ndarray  # [N + 1]
    kp_offsets: np.ndarray  # [N + 1]
    pose_cut: np.ndarray  # [N] the best pose confidence not kept (-1: every candidate above the floor kept)
    arrays: dict  # name -> memory-mapped array (_POSE_ARRAYS, _KP_ARRAYS)

    def image(self, i: int) -> Candidates:
        p0, p1 = int(self.pose_offsets[i]), int(self.pose_offsets[i + 1])
        k0, k1 = int(self.kp_offsets[i]), int(self.kp_offsets[i + 1])
        a = self.arrays
        return Candidates(
            pose_boxes=torch.from_numpy(np.array(a["pose_boxes"][p0:p1])),
            pose_scores=torch.from_numpy(np.array(a["pose_scores"][p0:p1])),
            pose_keypoints=torch.from_numpy(np.array(a["pose_keypoints"][p0:p1])),
            kp_boxes=torch.from_numpy(np.array(a["kp_boxes"][k0:k1])),
            kp_scores=torch.from_numpy(np.array(a["kp_scores"][k0:k1])),
            kp_classes=torch.from_numpy(np.array(a["kp_classes"][k0:k1], dtype=np.int64)),
        )

    def letterbox(self, i: int) -> tuple[float, tuple[float, float]]:
        return float(self.ratios[i]), (float(self.pads[i, 0]), float(self.pads[i, 1]))

    @classmethod
    def open(cls, path: Path) -> ModeCandidates:
        with np.load(path / "images.npz") as images:
            index = {name: images[name] for name in images.files}
        arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r") for name in _POSE_ARRAYS + _KP_ARRAYS}
        return cls(arrays=arrays, **index)


@dataclass
class CandidateCache:
    """An opened cache directory (module docstring): its TTA modes, opened when first asked for."""

    path: Path
    info: dict
    modes: dict = field(default_factory=dict, repr=False)  # TTA mode -> ModeCandidates, opened once

    @classmethod
    def open(cls, path: str | os.PathLike) -> CandidateCache:
        path = Path(path)
        try:
            info = json.loads((path / "info.json").read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"candidate cache {str(path)!r} is incomplete or unreadable: {err}") from err
        return cls(path, info)

    @property
    def pose_floor(self) -> float:
        return float(self.info["pose_floor"])

    @property
    def keypoint_floor(self) -> float:
        return float(self.info["keypoint_floor"])

    def mode(self, tta: str) -> ModeCandidates:
        if tta not in self.modes:
            directory = self.path / tta
            if not (directory / "images.npz").is_file():
                raise ValueError(
                    f"candidate cache {self.path} holds no TTA mode {tta!r} (it holds "
                    f"{', '.join(sorted(self.info.get('modes', []))) or 'none'}): the search space must name "
                    "every mode its trials can ask for"
                )
            self.modes[tta] = ModeCandidates.open(directory)
        return self.modes[tta]

    def check(self, settings: KapaoEvalConfig) -> None:
        """Settings the cache cannot answer: thresholds below its floors (those candidates were not kept)."""
        if np.float32(settings.tau_cp) < np.float32(self.pose_floor):
            raise ValueError(
                f"eval.tau_cp {settings.tau_cp} is below the {self.pose_floor} the candidate cache "
                f"{self.path} was built with (pose candidates scoring less were not kept)"
            )
        if np.float32(settings.tau_ck) < np.float32(self.keypoint_floor):
            raise ValueError(
                f"eval.tau_ck {settings.tau_ck} is below the {self.keypoint_floor} the candidate cache "
                f"{self.path} was built with (keypoint candidates scoring less were not kept)"
            )

    def poses(self, settings: KapaoEvalConfig, image_ids=None) -> tuple[list, list, int]:
        """``(image ids, per-image (keypoints, scores), images whose cache ran out)`` at ``settings``, for
        every image or those of ``image_ids``."""
        settings.validate()
        self.check(settings)
        cached = self.mode(settings.tta)
        rows = range(len(cached.image_ids))
        if image_ids is not None:
            wanted = {int(i) for i in image_ids}
            rows = [i for i in rows if int(cached.image_ids[i]) in wanted]
        ids, poses, short = [], [], 0
        tau_cp, tau_fc = np.float32(settings.tau_cp), np.float32(settings.tau_fc)
        for i in rows:
            keypoints, scores = poses_from_candidates(cached.image(i), settings, cached.letterbox(i))
            cut = cached.pose_cut[i]
            if cut > tau_cp and (len(scores) < settings.max_poses or (settings.fusion and cut > tau_fc)):
                short += 1  # NMS may have needed pose candidates below the cut
            ids.append(int(cached.image_ids[i]))
            poses.append((keypoints, scores))
        return ids, poses, short

    def evaluate(self, settings: KapaoEvalConfig, evaluator, image_ids=None) -> tuple[dict, int, int]:
        """COCO-WholeBody metrics of one trial's settings (``evaluator``: a ``WholeBodyEvaluator``), the
        images scored and the images whose cache ran out. The poses become results as in ``fowkal eval``
        (``predict_poses``' arrays, then the family's ``results``, which reads no config)."""
        from trainer.kapao.family import KAPAO, predictions_from_poses

        ids, poses, short = self.poses(settings, image_ids)
        results = KAPAO.results(predictions_from_poses(ids, poses), None)
        return evaluator.evaluate(results), len(ids), short


def _sorted_rows(scores: torch.Tensor, depth: int) -> tuple[torch.Tensor, float]:
    """Indices of the best ``depth`` rows, best first (ties in their order), and the best score not kept."""
    order = torch.argsort(scores, descending=True, stable=True)
    cut = float(scores[order[depth]]) if len(order) > depth else -1.0
    return order[:depth], cut


@torch.no_grad()
def _build_mode(loaded, dataset, tta, pose_floor, keypoint_floor, pose_depth, keypoint_depth, directory,
                device, amp_dtype, batch_size, workers, progress) -> None:  # fmt: skip
    from trainer.evaluation.model_eval import with_progress
    from trainer.kapao.family import batch_candidates, collate_batch

    model = loaded.model.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=collate_batch)  # fmt: skip
    index: dict[str, list] = {"image_ids": [], "ratios": [], "pads": [], "pose_cut": []}
    chunks: dict[str, list] = {name: [] for name in _POSE_ARRAYS + _KP_ARRAYS}
    pose_counts, kp_counts = [0], [0]
    k = None
    for batch in with_progress(loader, len(loader), f"candidates ({tta})", enabled=progress):
        ids, letterboxes, found = batch_candidates(
            model, batch, tta, pose_floor, keypoint_floor, device, amp_dtype, False
        )
        for image_id, (ratio, pad), cands in zip(ids, letterboxes, found, strict=True):
            cands = cands.to("cpu")
            k = cands.num_keypoints
            poses, cut = _sorted_rows(cands.pose_scores, pose_depth)
            kps, _ = _sorted_rows(cands.kp_scores, keypoint_depth)
            chunks["pose_boxes"].append(cands.pose_boxes[poses].numpy())
            chunks["pose_scores"].append(cands.pose_scores[poses].numpy())
            chunks["pose_keypoints"].append(cands.pose_keypoints[poses].numpy())
            chunks["kp_boxes"].append(cands.kp_boxes[kps].numpy())
            chunks["kp_scores"].append(cands.kp_scores[kps].numpy())
            chunks["kp_classes"].append(cands.kp_classes[kps].numpy().astype(np.int16))
            index["image_ids"].append(int(image_id))
            index["ratios"].append(ratio)
            index["pads"].append(pad)
            index["pose_cut"].append(cut)
            pose_counts.append(len(poses))
            kp_counts.append(len(kps))
    k = k or 17
    empty = {"pose_boxes": (0, 4), "pose_scores": (0,), "pose_keypoints": (0, k, 2), "kp_boxes": (0, 4),
             "kp_scores": (0,), "kp_classes": (0,)}  # fmt: skip
    for name, values in chunks.items():
        array = np.concatenate(values) if values else np.zeros(empty[name], np.float32)
        np.save(directory / f"{name}.npy", array.astype(np.int16 if name == "kp_classes" else np.float32))
    np.savez(
        directory / "images.npz",
        image_ids=np.asarray(index["image_ids"], np.int64),
        ratios=np.asarray(index["ratios"], np.float64),
        pads=np.asarray(index["pads"], np.float64).reshape(-1, 2),
        pose_cut=np.asarray(index["pose_cut"], np.float32),
        pose_offsets=np.cumsum(pose_counts).astype(np.int64),
        kp_offsets=np.cumsum(kp_counts).astype(np.int64),
    )


def build_candidate_cache(
    loaded: LoadedCheckpoint,
    ann_file,
    image_dir,
    cache_root,
    *,
    modes=("none",),
    pose_floor: float = KapaoEvalConfig.tau_cp,
    keypoint_floor: float = KapaoEvalConfig.tau_ck,
    pose_depth: int = POSE_DEPTH,
    keypoint_depth: int = KEYPOINT_DEPTH,
    batch_size: int | None = None,
    workers: int | None = None,
    gpus: int | None = None,
    progress: bool = True,
) -> CandidateCache:
    """Run the network once per TTA mode of ``modes`` over every image of ``ann_file`` and keep the candidates
    above the floors under ``cache_root/<cache_key>/<mode>``; modes already there are reused.

    ``batch_size`` / ``workers`` default to the run's ``data.val_batch_size`` / ``data.loader_workers`` (the
    batches of ``fowkal eval``, whose float results the cache reproduces).
    """
    from trainer.evaluation.model_eval import build_eval_dataset, select_device
    from trainer.runtime import autocast_dtype

    for mode in modes:
        if mode not in TTA_MODES:
            raise ValueError(f"unknown TTA mode {mode!r} (known: {', '.join(TTA_MODES)})")
    key = cache_key(loaded, ann_file, image_dir, pose_floor, keypoint_floor, pose_depth, keypoint_depth)
    final = Path(cache_root) / key
    final.mkdir(parents=True, exist_ok=True)
    config = loaded.config
    with locked(final / ".lock"):
        info_path = final / "info.json"
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        done = {m for m in TTA_MODES if (final / m / "images.npz").is_file()}
        missing = [m for m in dict.fromkeys(modes) if m not in done]
        if missing:
            dataset = build_eval_dataset(config, ann_file, image_dir)
            batch_size = config.data.val_batch_size if batch_size is None else int(batch_size)
            workers = config.data.loader_workers if workers is None else int(workers)
            device, _ = select_device(gpus)
            amp_dtype = autocast_dtype(device, config.amp)
            for mode in missing:
                scratch = Path(tempfile.mkdtemp(prefix=f".{mode}-", dir=final))
                try:
                    _build_mode(loaded, dataset, mode, pose_floor, keypoint_floor, pose_depth, keypoint_depth,
                                scratch, device, amp_dtype, batch_size, workers, progress)  # fmt: skip
                    shutil.rmtree(final / mode, ignore_errors=True)
                    os.replace(scratch, final / mode)
                except BaseException:
                    shutil.rmtree(scratch, ignore_errors=True)
                    raise
            done |= set(missing)
        info = {
            "key": key,
            "family": FAMILY,
            "format": _FORMAT,
            "checkpoint": str(loaded.checkpoint_path),
            "ann_file": str(ann_file),
            "image_dir": str(image_dir),
            "pose_floor": float(pose_floor),
            "keypoint_floor": float(keypoint_floor),
            "pose_depth": int(pose_depth),
            "keypoint_depth": int(keypoint_depth),
            "modes": sorted(done),
        }
        scratch_info = final / f".info-{os.getpid()}.json"
        scratch_info.write_text(json.dumps(info, indent=1))
        os.replace(scratch_info, info_path)
    return CandidateCache.open(final)


__all__ = [
    "KEYPOINT_DEPTH",
    "POSE_DEPTH",
    "CandidateCache",
    "ModeCandidates",
    "build_candidate_cache",
    "cache_key",
]
