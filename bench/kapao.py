"""KAPAO's costs on this machine, beside the top-down family's where they do the same job.

1. Forward images/s of KAPAO-S (batch 1, eval, no grad) at the smoke size and at the paper's 1280, K = 17
   and 133, torch's default threads.
2. The size of the raw head output per image at 1280 (K = 17 and 133): what an inference-time sweep must not
   cache (trainer.kapao.postprocess.candidates keeps the candidates above the thresholds instead).
3. Post-processing ms per image on one thread (decode of the candidates + NMS of both object types + fusion +
   unfused scores; ``poses_from_outputs``) for a crowd of 20 people, K = 17 and 133 (goal: <= 2 ms at K = 17,
   as the paper's fusion <= 1.7 ms), beside the top-down family's decoding of the same 20 people (flip-back
   + DARK + the inverse crop affine of 20 crops with 64x48 heatmaps;
   ``trainer.topdown.inference.decode_heatmaps``).

    .venv/bin/python bench/kapao.py [--quick]

Prints Markdown tables (for bench/RESULTS.md, "KAPAO").
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from trainer.kapao.anchors import P6_ANCHORS, STRIDES, outputs_per_anchor  # noqa: E402
from trainer.kapao.model import build_kapao_model  # noqa: E402
from trainer.kapao.postprocess import KapaoEvalConfig, candidates, poses_from_outputs  # noqa: E402
from trainer.topdown.inference import decode_heatmaps  # noqa: E402

BACKGROUND = -20.0  # objectness logit of an empty anchor: sigmoid ~2e-9, below every floor


def _logit(p):
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def best_ms(fn, repeats: int) -> float:
    """The best of ``repeats`` timed calls after one warm-up (the machine is shared), in ms."""
    fn()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def crowd_outputs(k: int, size: int, people: int, rng) -> list[torch.Tensor]:
    """Raw outputs of a crowd: per person ~150 pose anchors in a cluster (0.001-0.9), two keypoint objects per
    keypoint type near its pose keypoint, plus a few hundred stray low-confidence objects."""
    outputs = [torch.zeros(1, 3, size // s, size // s, outputs_per_anchor(k)) for s in STRIDES]
    for out in outputs:
        out[..., 4] = BACKGROUND
        out[..., 5:] = torch.from_numpy(rng.normal(0, 0.5, out.shape[:4] + (out.shape[-1] - 5,))).float()
        out[..., 5 : 5 + k + 1] = -8.0

    def put(level, a, gy, gx, cls, conf):
        cells = outputs[level].shape[2]
        gy, gx = int(np.clip(gy, 0, cells - 1)), int(np.clip(gx, 0, cells - 1))
        row = outputs[level][0, a, gy, gx]
        row[4] = float(_logit(np.sqrt(conf)))
        row[5 + cls] = float(_logit(np.sqrt(conf)))
        return gx, gy, row

    for _ in range(people):
        level = int(rng.integers(1, 3))
        s = STRIDES[level]
        cx, cy = rng.integers(0, size // s, 2)
        for _ in range(150):  # the cluster of weaker duplicates, then the person's best anchor
            put(
                level,
                rng.integers(0, 3),
                cy + rng.integers(-3, 4),
                cx + rng.integers(-3, 4),
                0,
                rng.uniform(0.03, 0.5) ** 2,
            )
        a = int(rng.integers(0, 3))
        gx, gy, row = put(level, a, cy, cx, 0, 0.9)
        keypoints = (4 * torch.sigmoid(row[-2 * k :]).reshape(k, 2) - 2) * torch.tensor(
            P6_ANCHORS[level][a], dtype=torch.float32
        ) + torch.tensor([gx, gy]) * s
        for kp in range(k):
            for _ in range(2):
                x, y = (keypoints[kp].numpy() + rng.normal(0, 3, 2)) / 8
                put(0, 1, y, x, kp + 1, float(rng.uniform(0.2, 0.9)))
    for _ in range(300):  # stray objects
        level, a = int(rng.integers(0, 4)), int(rng.integers(0, 3))
        cells = outputs[level].shape[2]
        cls = int(rng.integers(0, k + 1))
        put(level, a, rng.integers(0, cells), rng.integers(0, cells), cls, float(rng.uniform(0.001, 0.3)))
    return outputs


def forward_rows(sizes, repeats: int) -> list[str]:
    rows = ["| input | K | forward ms (batch 1) | img/s |", "| --- | --- | --- | --- |"]
    for k in (17, 133):
        model = build_kapao_model("s", k).eval()
        for size in sizes:
            images = torch.rand(1, 3, size, size)
            with torch.no_grad():
                ms = best_ms(lambda model=model, images=images: model(images), repeats)
            rows.append(f"| {size} | {k} | {ms:.1f} | {1e3 / ms:.2f} |")
    return rows


def head_size_rows() -> list[str]:
    rows = [
        "| K | anchors at 1280 | outputs per anchor | float32 MB per image |",
        "| --- | --- | --- | --- |",
    ]
    anchors = sum(3 * (1280 // s) ** 2 for s in STRIDES)
    for k in (17, 133):
        values = anchors * outputs_per_anchor(k)
        rows.append(f"| {k} | {anchors:,} | {outputs_per_anchor(k)} | {values * 4 / 1e6:.0f} |")
    return rows


def postprocess_rows(repeats: int) -> list[str]:
    torch.set_num_threads(1)
    settings, letterbox = KapaoEvalConfig(), (1.0, (0.0, 0.0))
    rows = [
        "| family | K | candidates (pose / keypoint) | ms per image, one thread |",
        "| --- | --- | --- | --- |",
    ]
    for k in (17, 133):
        outputs = crowd_outputs(k, 1280, people=20, rng=np.random.default_rng(k))
        found = candidates(outputs, settings.tau_cp, settings.tau_ck)[0]
        ms = best_ms(lambda outputs=outputs: poses_from_outputs(outputs, settings, [letterbox]), repeats)
        counts = f"{len(found.pose_scores)} / {len(found.kp_scores)}"
        rows.append(f"| KAPAO: decode + 2 NMS + fusion | {k} | {counts} | {ms:.2f} |")
    # The top-down family decodes the same 20 people: 20 crops, their mirrors, 133 heatmaps of 64x48 each.
    generator = torch.Generator().manual_seed(0)
    heatmaps = torch.rand(20, 133, 64, 48, generator=generator)
    flipped = torch.rand(20, 133, 64, 48, generator=generator)
    center = np.full((20, 2), 300.0)
    scale = np.full((20, 2), 200.0)
    ms = best_ms(lambda: decode_heatmaps(heatmaps, flipped, center, scale), repeats)
    rows.append(f"| top-down: flip-back + DARK (20 crops) | 133 | 20 boxes | {ms:.2f} |")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smoke size only for the forward")
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else 10
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}"
    )
    print("\n".join(forward_rows((256,) if args.quick else (256, 1280), 2 if args.quick else 5)))
    print()
    print("\n".join(head_size_rows()))
    print()
    print("\n".join(postprocess_rows(repeats)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
