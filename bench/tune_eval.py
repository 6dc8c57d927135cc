"""``fowkal tune-eval`` on the smoke config's checkpoint: wall time of a 32-trial sweep, where it goes, and
whether the heatmap cache could be float16.

1. A smoke-trained checkpoint (``configs/smoke.yaml`` trained with the plain loop in a temporary directory,
   or ``--checkpoint``) and its 32 synthetic validation images (ground-truth boxes).
2. Cache precision: the cached float32 heatmaps decoded as they are and rounded to float16, for every flip
   mode and the kernels 3, 11, 15: the largest keypoint difference in image pixels (goal for float16:
   <= 1e-3 px).
3. ``fowkal tune-eval --samples N`` as a subprocess (the command a user runs, Ray start-up included): wall
   time, and from the parent run the time of the checks, the one forward pass, the Tune part, the
   defaults' and the best AP, the gain, the importances; per trial, the median evaluation time.
4. Per-trial decode cost at the paper's size (64x48 heatmaps, 133 keypoints), to put a val-scale trial
   (45,000 detections) next to the evaluation itself (bench/scale.py measures that).

    .venv/bin/python bench/tune_eval.py [--checkpoint CKPT.pt | --keep DIR] [--epochs N] [--samples 32]

Prints Markdown (for bench/RESULTS.md, "Inference-time sweeps").
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from trainer.codec import FLIP_MODES  # noqa: E402
from trainer.config import EvalConfig, load_config  # noqa: E402
from trainer.inference import decode_heatmaps  # noqa: E402


def train_smoke(directory: Path, epochs: int | None) -> Path:
    from trainer.loop import train_loop_per_worker

    overrides = [f"output_dir={directory / 'run'}", f"data.synthetic_dir={directory / 'synthetic'}"]
    if epochs is not None:
        overrides.append(f"epochs={epochs}")
    cfg = load_config(ROOT / "configs" / "smoke.yaml", overrides)
    start = time.perf_counter()
    train_loop_per_worker(cfg)
    print(f"(smoke training: {time.perf_counter() - start:.0f} s, {cfg.epochs} epochs)\n", flush=True)
    return Path(cfg.output_dir) / "checkpoints" / "latest.pt"


def untrained_smoke(directory: Path) -> Path:
    """The smoke config's model with its initial weights (timing only: the trial cost does not depend on
    what the weights learned, the boxes are the same ground-truth boxes)."""
    from trainer.checkpoint import save_atomic
    from trainer.config import config_to_dict
    from trainer.loop import resolve_datasets
    from trainer.model import build_pose_model

    cfg = load_config(ROOT / "configs" / "smoke.yaml", [f"data.synthetic_dir={directory / 'synthetic'}"])
    resolve_datasets(cfg.data)
    torch.manual_seed(cfg.seed)
    model = build_pose_model(cfg.model.backbone, 133, with_kaf=True)
    path = directory / "untrained.pt"
    save_atomic({"model": model.state_dict(), "config": config_to_dict(cfg), "epoch": 0}, path)
    return path


def float16_error(cache) -> list[tuple[str, int, float, float]]:
    """(mode, kernel, max |float16 - float32| keypoint shift in image px, same in heatmap px)."""
    rows = []
    plain32 = torch.from_numpy(np.array(cache.plain, dtype=np.float32))
    mirrored32 = torch.from_numpy(np.array(cache.mirrored, dtype=np.float32))
    plain16 = plain32.half().float()
    mirrored16 = mirrored32.half().float()
    per_px = cache.scale[:, 0] / cache.plain.shape[-1]  # image px per heatmap px, per box
    for mode in FLIP_MODES:
        for kernel in (3, 11, 15):
            args = (cache.center, cache.scale, mode, cache.stride, kernel)
            exact, _ = decode_heatmaps(plain32, mirrored32, *args)
            rounded, _ = decode_heatmaps(plain16, mirrored16, *args)
            shift = np.abs(exact.astype(np.float64) - rounded).max(axis=-1)  # [N, K]
            rows.append((mode, kernel, float(shift.max()), float((shift / per_px[:, None]).max())))
    return rows


def decode_cost(boxes: int = 256) -> dict[str, float]:
    """Seconds per 1,000 boxes to flip back, average and DARK-decode 133 maps of 64x48 (one thread)."""
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:64, 0:48]
    centres = rng.uniform([8, 8], [56, 40], size=(boxes, 133, 2))
    maps = np.exp(-((xs - centres[..., 1, None, None]) ** 2 + (ys - centres[..., 0, None, None]) ** 2) / 8.0)
    plain = torch.from_numpy(maps.astype(np.float32))
    mirrored = plain.flip(-1).contiguous()
    center = np.tile([[100.0, 100.0]], (boxes, 1))
    scale = np.tile([[192.0, 256.0]], (boxes, 1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    try:
        for mode in ("shift", "exact"):
            start = time.perf_counter()
            for first in range(0, boxes, 64):
                rows = slice(first, first + 64)
                decode_heatmaps(plain[rows], mirrored[rows], center[rows], scale[rows], mode, 4.0, 11)
            out[mode] = (time.perf_counter() - start) / boxes * 1000  # seconds per 1,000 boxes
    finally:
        torch.set_num_threads(threads)
    return out


def run_cli(checkpoint: Path, samples: int, work: Path) -> dict:
    from orchestrator import tracking
    from trainer.checkpoint import load_checkpoint_model
    from trainer.loop import resolve_datasets

    config = load_checkpoint_model(checkpoint).config
    paths = resolve_datasets(config.data)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    command = [
        str(ROOT / ".venv" / "bin" / "fowkal"),
        "tune-eval",
        "--checkpoint",
        str(checkpoint),
        "--ann",
        paths["val_ann"],
        "--images",
        paths["val_images"],
        "--space",
        str(ROOT / "search_spaces" / "eval_space.yaml"),
        "--samples",
        str(samples),
        "--seed",
        "0",
        "--storage-path",
        str(work / "store"),
        "--tracking-uri",
        uri,
        "--quiet",
    ]
    start = time.perf_counter()
    done = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        print(done.stdout[-3000:], done.stderr[-3000:])
        raise SystemExit(f"fowkal tune-eval exited {done.returncode}")
    client = tracking.make_client(uri)
    experiment = client.get_experiment_by_name("fowkal-tune-eval")
    parent = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`fowkal.tune_eval` = 'sweep'", max_results=1
    )[0]
    children = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
        max_results=1000,
    )
    trial_s = [c.data.metrics["time/trial_s"] for c in children if "time/trial_s" in c.data.metrics]
    summary = Path(parent.data.tags["fowkal.sweep_dir"]) / "summary.md"
    return {
        "wall": wall,
        "metrics": dict(parent.data.metrics),
        "children": len(children),
        "statuses": sorted({c.info.status for c in children}),
        "trial_s": float(np.median(trial_s)) if trial_s else float("nan"),
        "summary": summary.read_text() if summary.is_file() else "",
        "config": config,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, help="use this checkpoint instead of training one")
    parser.add_argument(
        "--epochs", type=int, default=None, help="smoke training epochs (default: the config's)"
    )
    parser.add_argument("--samples", type=int, default=32, help="tune-eval trials")
    parser.add_argument(
        "--keep", type=Path, help="train the smoke checkpoint into this directory and keep it"
    )
    parser.add_argument("--untrained", action="store_true", help="time it on the untrained smoke model")
    args = parser.parse_args(argv)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}\n"
    )
    with tempfile.TemporaryDirectory(prefix="bench_tune_eval_") as tmp:
        work = Path(tmp)
        if args.untrained:
            checkpoint = untrained_smoke(args.keep or work)
        else:
            checkpoint = args.checkpoint or train_smoke(args.keep or work, args.epochs)
        result = run_cli(checkpoint, args.samples, work)
        m = result["metrics"]
        print(f"## `fowkal tune-eval --samples {args.samples}` on {checkpoint.name} (smoke, 32 val images)\n")
        print("| Measurement | Figure |\n|---|---|")
        print(f"| wall time of the command (Ray start-up included) | {result['wall']:.1f} s |")
        for key, label in (
            ("time/checks_s", "checks (space, checkpoint, files)"),
            ("time/heatmaps_s", "the one forward pass (plain + mirrored, every box)"),
            ("time/tune_s", "Ray start + Tune (all trials)"),
        ):
            print(f"| {label} | {m.get(key, float('nan')):.1f} s |")
        print(
            "| one trial's evaluation (median: decode, rescoring, NMS, xtcocotools) | "
            f"{result['trial_s']:.2f} s |"
        )
        print(f"| child runs / their statuses | {result['children']} / {', '.join(result['statuses'])} |")
        for key in ("defaults/eval/wholebody_AP", "best/eval/wholebody_AP", "gain/eval/wholebody_AP"):
            print(f"| {key} | {m.get(key, float('nan')):.4f} |")
        print()
        print(result["summary"])

        from trainer.heatmap_cache import HeatmapCache

        cache_dirs = [p for p in (work / "store" / "heatmap_cache").iterdir() if p.is_dir()]
        cache = HeatmapCache.open(cache_dirs[0])
        print(f"## float16 instead of float32 in the cache ({len(cache.image_ids)} boxes x 133 keypoints)\n")
        print("| flip mode | kernel | max shift, image px | max shift, heatmap px |\n|---|---|---|---|")
        for mode, kernel, image_px, heatmap_px in float16_error(cache):
            print(f"| {mode} | {kernel} | {image_px:.2e} | {heatmap_px:.2e} |")
        print()
    cost = decode_cost()
    print("## Decode cost at the paper's size (133 x 64x48 maps per box, one thread)\n")
    for mode, seconds in cost.items():
        print(
            f"- flip `{mode}` + DARK (kernel 11): {seconds:.2f} s per 1,000 boxes -> {seconds * 45:.0f} s "
            "for 45,000 boxes"
        )
    size = 45000 * 133 * 64 * 48 * 4 * 2 / 2**30
    print(f"- cache size at val scale (45,000 boxes, plain + mirrored, float32): {size:.0f} GiB")
    print(f"\n(defaults: {EvalConfig()})")


if __name__ == "__main__":
    main()
