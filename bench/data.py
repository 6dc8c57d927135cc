"""Data pipeline and DARK codec throughput.

Prints, each beside a baseline measured in the same run:
- ``encode_unbiased`` and ``decode_dark`` for N = 64 instances x 133 keypoints on 64x48 heatmaps, against a
  straightforward per-keypoint Python loop (goal: >= 10x each);
- samples per second of one worker (main process, one OpenCV / torch thread) of the full training pipeline
  (``trainer.topdown.data.WholeBodyTopDownDataset``, ``train=True``) on the COCO-WholeBody mini set's images
  and on
  synthetic images (``trainer.datasets.synth.write_synthetic_dataset``);
- target generation (``encode_unbiased`` for one instance) as a fraction of one sample's pipeline time
  (goal: <= 10%).

Usage: ``.venv/bin/python bench/data.py [--quick]``. Everything runs on one CPU thread, so that the figures
are per DataLoader worker and the vectorised code gets no help from extra threads.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch

from trainer.topdown.codec import decode_dark, encode_unbiased

REPO = Path(__file__).resolve().parents[1]
MINI_DIR = REPO.parent / "shared" / "data" / "coco_wholebody_mini"
HEATMAP_W, HEATMAP_H = 48, 64
NUM_INSTANCES, NUM_KEYPOINTS = 64, 133
SIGMA = 2.0
BLUR_KERNEL = 11


def best_time(function: Callable[[], object], repeats: int) -> float:
    """Smallest wall time of ``repeats`` calls (least disturbed by the other processes on the machine)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def encode_loop(keypoints: np.ndarray, visible: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Baseline: one Gaussian per keypoint in a Python loop (vectorised over pixels only)."""
    num, num_kpts = keypoints.shape[:2]
    heatmaps = np.zeros((num, num_kpts, HEATMAP_H, HEATMAP_W), dtype=np.float32)
    weights = np.zeros((num, num_kpts), dtype=np.float32)
    xs = np.arange(HEATMAP_W, dtype=np.float32)
    ys = np.arange(HEATMAP_H, dtype=np.float32)[:, None]
    radius = 3 * SIGMA
    for n in range(num):
        for k in range(num_kpts):
            x, y = keypoints[n, k]
            if visible[n, k] <= 0:
                continue
            if x + radius < 0 or x - radius > HEATMAP_W - 1 or y + radius < 0 or y - radius > HEATMAP_H - 1:
                continue
            weights[n, k] = 1.0
            heatmaps[n, k] = np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * SIGMA**2))
    return heatmaps, weights


def decode_loop(heatmaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Baseline: DARK one keypoint at a time (OpenCV blur, NumPy Taylor step), as a plain port would do."""
    num, num_kpts, height, width = heatmaps.shape
    border = (BLUR_KERNEL - 1) // 2
    coords = np.zeros((num, num_kpts, 2), dtype=np.float32)
    scores = np.zeros((num, num_kpts), dtype=np.float32)
    for n in range(num):
        for k in range(num_kpts):
            heatmap = heatmaps[n, k]
            index = int(np.argmax(heatmap))
            py, px = divmod(index, width)
            value = heatmap[py, px]
            scores[n, k] = value
            if value <= 0:
                coords[n, k] = -1
                continue
            padded = np.zeros((height + 2 * border, width + 2 * border), dtype=np.float32)
            padded[border:-border, border:-border] = heatmap
            blurred = cv2.GaussianBlur(padded, (BLUR_KERNEL, BLUR_KERNEL), 0)[border:-border, border:-border]
            blurred = blurred * (value / blurred.max())
            log_map = np.log(np.maximum(blurred, 1e-10))
            x, y = float(px), float(py)
            if 2 <= px <= width - 3 and 2 <= py <= height - 3:
                dx = 0.5 * (log_map[py, px + 1] - log_map[py, px - 1])
                dy = 0.5 * (log_map[py + 1, px] - log_map[py - 1, px])
                dxx = 0.25 * (log_map[py, px + 2] - 2 * log_map[py, px] + log_map[py, px - 2])
                dyy = 0.25 * (log_map[py + 2, px] - 2 * log_map[py, px] + log_map[py - 2, px])
                dxy = 0.25 * (
                    log_map[py + 1, px + 1]
                    - log_map[py - 1, px + 1]
                    - log_map[py + 1, px - 1]
                    + log_map[py - 1, px - 1]
                )
                hessian = np.array([[dxx, dxy], [dxy, dyy]])
                if np.linalg.det(hessian) != 0:
                    offset = -np.linalg.solve(hessian, np.array([dx, dy]))
                    x, y = x + offset[0], y + offset[1]
            coords[n, k] = (x, y)
    return coords, scores


def bench_codec(repeats: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    keypoints = rng.uniform(
        [-4.0, -4.0], [HEATMAP_W + 3.0, HEATMAP_H + 3.0], size=(NUM_INSTANCES, NUM_KEYPOINTS, 2)
    )
    visible = (rng.random((NUM_INSTANCES, NUM_KEYPOINTS)) < 0.85).astype(np.float32)

    vec_heatmaps, vec_weights = encode_unbiased(keypoints, visible, (HEATMAP_W, HEATMAP_H), SIGMA)
    loop_heatmaps, loop_weights = encode_loop(keypoints, visible)
    encode_diff = float(np.abs(vec_heatmaps - loop_heatmaps).max())
    assert np.array_equal(vec_weights, loop_weights), "encode: vectorised and loop weights differ"

    t_encode = best_time(lambda: encode_unbiased(keypoints, visible, (HEATMAP_W, HEATMAP_H), SIGMA), repeats)
    t_encode_loop = best_time(lambda: encode_loop(keypoints, visible), max(1, repeats // 2))
    # As the dataset calls it: one instance per call.
    t_encode_single = best_time(
        lambda: [
            encode_unbiased(keypoints[n : n + 1], visible[n : n + 1], (HEATMAP_W, HEATMAP_H), SIGMA)
            for n in range(NUM_INSTANCES)
        ],
        repeats,
    )
    # Lower bound for any encoder returning a fresh [N, K, H, W] float32 array: allocate it and write it once.
    shape = (NUM_INSTANCES, NUM_KEYPOINTS, HEATMAP_H, HEATMAP_W)
    t_write_floor = best_time(lambda: np.empty(shape, dtype=np.float32).fill(0.5), repeats)

    # Decode realistic maps: the targets plus low-level noise (as a network's output would have).
    heatmaps = (vec_heatmaps + 0.02 * rng.random(vec_heatmaps.shape, dtype=np.float32)).astype(np.float32)
    vec_coords, vec_scores = decode_dark(heatmaps, BLUR_KERNEL)
    loop_coords, loop_scores = decode_loop(heatmaps)
    # Maps of invisible keypoints are pure noise (no peak): compare where there is one.
    decode_diff = float(np.abs(vec_coords - loop_coords)[vec_weights > 0].max())
    heatmaps_tensor = torch.from_numpy(heatmaps)
    t_decode = best_time(lambda: decode_dark(heatmaps, BLUR_KERNEL), repeats)
    t_decode_torch = best_time(lambda: decode_dark(heatmaps_tensor, BLUR_KERNEL), repeats)
    t_decode_loop = best_time(lambda: decode_loop(heatmaps), max(1, repeats // 2))

    maps = NUM_INSTANCES * NUM_KEYPOINTS
    print(f"\n## Codec: N={NUM_INSTANCES} x K={NUM_KEYPOINTS} on {HEATMAP_H}x{HEATMAP_W} heatmaps (1 thread)")
    print(f"{'':34s} {'time (ms)':>10s} {'maps/s':>12s} {'vs loop':>8s}")
    rows = [
        ("encode_unbiased (vectorised)", t_encode, t_encode_loop),
        ("encode_unbiased, 64 calls of N=1", t_encode_single, t_encode_loop),
        ("encode per-keypoint loop", t_encode_loop, t_encode_loop),
        ("(floor: allocate + write output)", t_write_floor, t_encode_loop),
        ("decode_dark (vectorised, NumPy)", t_decode, t_decode_loop),
        ("decode_dark (vectorised, torch)", t_decode_torch, t_decode_loop),
        ("decode per-keypoint loop", t_decode_loop, t_decode_loop),
    ]
    for name, seconds, baseline in rows:
        print(f"{name:34s} {seconds * 1e3:10.1f} {maps / seconds:12.0f} {baseline / seconds:7.1f}x")
    print(f"max |vectorised - loop|: heatmaps {encode_diff:.2e}, decoded peaks {decode_diff:.2e} px")
    return {
        "encode_speedup": t_encode_loop / t_encode,
        "encode_single_speedup": t_encode_loop / t_encode_single,
        "encode_over_floor": t_encode / t_write_floor,
        "decode_speedup": t_decode_loop / t_decode,
        "decode_torch_speedup": t_decode_loop / t_decode_torch,
    }


def _image_root_for(ann_file: Path) -> Path:
    """Directory under which the annotation file's ``file_name`` entries exist (the synth layout may vary)."""
    import json

    first = json.loads(ann_file.read_text())["images"][0]["file_name"]
    for root in (ann_file.parent, ann_file.parent / "images", ann_file.parent.parent / "images"):
        if (root / first).is_file():
            return root
    raise FileNotFoundError(f"cannot find {first} next to {ann_file}")


def bench_pipeline(
    name: str, ann_file: Path, image_root: Path, num_samples: int, repeats: int
) -> dict[str, float]:
    from trainer.topdown.data import PipelineConfig, WholeBodyTopDownDataset

    config = PipelineConfig()
    dataset = WholeBodyTopDownDataset(ann_file, image_root, config=config, train=True)
    torch.manual_seed(0)
    for index in range(min(len(dataset), 3)):  # warm-up (imports, caches)
        dataset[index]
    samples: list[dict] = []

    def one_pass() -> None:
        samples.clear()
        for step in range(num_samples):
            samples.append(dataset[step % len(dataset)])

    per_sample = best_time(one_pass, repeats) / num_samples

    # Target generation alone, on the same samples' keypoints (input -> heatmap pixels, as the dataset).
    ratio = np.array(config.heatmap_size, dtype=np.float32) / np.array(config.input_size, dtype=np.float32)
    targets_in = [
        ((s["keypoints"].numpy() * ratio)[None], s["keypoints_visible"].numpy()[None]) for s in samples
    ]

    def all_targets() -> None:
        for keypoints, visible in targets_in:
            encode_unbiased(keypoints, visible, config.heatmap_size, config.sigma)

    per_target = best_time(all_targets, repeats) / len(targets_in)

    print(
        f"{name:34s} {len(dataset):8d} {1.0 / per_sample:12.1f} {per_sample * 1e3:12.2f} "
        f"{per_target * 1e3:10.3f} {100 * per_target / per_sample:9.1f}%"
    )
    return {"samples_per_s": 1.0 / per_sample, "target_fraction": per_target / per_sample}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer repeats and samples (a smoke run)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    repeats = 2 if args.quick else 5
    num_samples = 30 if args.quick else 200

    codec = bench_codec(repeats)

    print("\n## Training pipeline, one worker (train=True: half-body, scale, rotation, flip, warp, targets)")
    header = ("data", "samples", "samples/s", "ms/sample", "target ms", "target %")
    print(
        f"{header[0]:34s} {header[1]:>8s} {header[2]:>12s} {header[3]:>12s} {header[4]:>10s} {header[5]:>10s}"
    )
    pipeline: dict[str, dict[str, float]] = {}
    ann_file = MINI_DIR / "test_coco_wholebody.json"
    if ann_file.is_file():
        pipeline["mini"] = bench_pipeline(
            "COCO-WholeBody mini (real JPEGs)", ann_file, MINI_DIR, num_samples, repeats
        )
    else:
        print(f"(skipped: {ann_file} not found)")
    try:
        from trainer.datasets.synth import write_synthetic_dataset
    except ImportError as error:
        print(f"(synthetic data skipped: {error})")
    else:
        with tempfile.TemporaryDirectory() as out_dir:
            synth_ann = Path(write_synthetic_dataset(out_dir, num_images=8 if args.quick else 32, seed=0))
            pipeline["synthetic"] = bench_pipeline(
                "synthetic (trainer.datasets.synth)",
                synth_ann,
                _image_root_for(synth_ann),
                num_samples,
                repeats,
            )

    print("\n## Goals")
    for name, key in (("encode", "encode_speedup"), ("decode", "decode_speedup")):
        verdict = "OK" if codec[key] >= 10 else "MISSED"
        print(f"{name} >= 10x the per-keypoint loop: {codec[key]:.1f}x {verdict}")
    print(
        f"  (encode one instance per call: {codec['encode_single_speedup']:.1f}x the loop; N=64 encode takes "
        f"{codec['encode_over_floor']:.2f}x the time of merely allocating and writing its output)"
    )
    for name, figures in pipeline.items():
        fraction = figures["target_fraction"]
        verdict = "OK" if fraction <= 0.10 else "MISSED"
        print(f"target generation <= 10% of a sample ({name}): {100 * fraction:.1f}% {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
