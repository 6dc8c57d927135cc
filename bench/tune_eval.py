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
4. Decoding at val scale (45,000 boxes of 133 maps of 64x48), before and now in the same run: before,
   every trial flipped back, averaged and DARK-decoded every box (the old flip-back and the batched DARK
   blur, kept here as the reference); now, one pass per flip mode decodes all 7 kernels of the space and a
   trial reads its (mode, kernel) keypoints and selects its boxes. Per 1,000 boxes and per trial, next to
   the evaluation itself (bench/scale.py measures that).

    .venv/bin/python bench/tune_eval.py [--checkpoint CKPT.pt | --keep DIR] [--epochs N] [--samples 32]
    .venv/bin/python bench/tune_eval.py --decode-only
    .venv/bin/python bench/tune_eval.py --family kapao [--checkpoint CKPT.pt | --keep DIR] [--samples 64]

``--family kapao``: the same command on a smoke KAPAO checkpoint (``configs/smoke_kapao.yaml``, trained with
the plain loop, or ``--checkpoint``) over ``search_spaces/kapao_eval_space.yaml`` (its candidates cached once
per TTA mode: none, flip, scales), 32 synthetic validation images; goal: 64 trials in <= 3 minutes, Ray
start-up included. Its rows: the wall time, the cache's passes, Tune, the median trial (two NMS passes,
fusion, scoring), the images whose cache ran out (0 expected), the defaults' and the best AP.

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

from trainer.config import EvalConfig, load_config  # noqa: E402
from trainer.topdown.codec import FLIP_MODES  # noqa: E402
from trainer.topdown.inference import decode_heatmaps  # noqa: E402

SMOKE_CONFIGS = {"topdown_heatmap": "smoke.yaml", "kapao": "smoke_kapao.yaml"}
EVAL_SPACES = {"topdown_heatmap": "eval_space.yaml", "kapao": "kapao_eval_space.yaml"}


def train_smoke(directory: Path, epochs: int | None, family: str = "topdown_heatmap") -> Path:
    from trainer.loop import train_loop_per_worker

    overrides = [f"output_dir={directory / 'run'}", f"data.synthetic_dir={directory / 'synthetic'}"]
    if epochs is not None:
        overrides.append(f"epochs={epochs}")
    cfg = load_config(ROOT / "configs" / SMOKE_CONFIGS[family], overrides)
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
    from trainer.topdown.model import build_pose_model

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


def _realistic_maps(boxes: int, seed: int) -> torch.Tensor:
    """133 sigma-2 Gaussians of 64x48 per box at sub-pixel places, amplitudes 0.05-1, low noise."""
    from trainer.topdown.codec import encode_unbiased

    rng = np.random.default_rng(seed)
    centres = rng.uniform([-3.0, -3.0], [50.0, 66.0], size=(boxes, 133, 2))
    maps, _ = encode_unbiased(centres, np.ones((boxes, 133)), (48, 64), 2.0)
    maps *= rng.uniform(0.05, 1.0, size=(boxes, 133, 1, 1)).astype(np.float32)
    maps += rng.normal(0.0, 0.01, maps.shape).astype(np.float32)
    return torch.from_numpy(maps)


def _decode_before(plain, mirrored, center, scale, mode, kernel):
    """decode_heatmaps as it was before the batched path: index_select + flip + cat (or the exact matrix
    after index_select), and DARK's stencil blur as two batched products over the whole batch."""
    import trainer.topdown.codec as codec
    from trainer.datasets.keypoints import flip_index

    swapped = mirrored.index_select(1, torch.as_tensor(flip_index()))
    if mode == "exact":
        flipped = swapped @ codec._exact_flip_matrix(48, 4.0, torch.float32, torch.device("cpu"))
    else:
        flipped = swapped.flip(-1)
        if mode == "shift":
            flipped = torch.cat([flipped[..., :1], flipped[..., :-1]], dim=-1)
    maps = 0.5 * (plain + flipped)
    original = codec._blur_stencil
    codec._blur_stencil = lambda patch, rows, cols: rows.transpose(1, 2) @ (patch @ cols)
    try:
        coords, scores = codec.decode_dark(maps, kernel)
    finally:
        codec._blur_stencil = original
    return codec.heatmap_to_image_coords(coords, center, scale, (48, 64)), scores.numpy()


def decode_cost(boxes: int = 256, trials: int = 32) -> list[tuple[str, float | None, float]]:
    """(what, seconds per 1,000 boxes or None, seconds per trial at 45,000 boxes), one thread, 64 boxes a
    batch: the decoding a trial did before (every trial decodes), and now (once per flip mode, for the 7
    kernels of eval_space.yaml, then every trial of that mode reads the keypoints and selects its boxes)."""
    from trainer.topdown.heatmap_cache import HeatmapCache, _read_decoded, _write_decoded

    plain, mirrored = _realistic_maps(boxes, 0), _realistic_maps(boxes, 1)
    center = np.random.default_rng(2).uniform(100.0, 500.0, size=(boxes, 2))
    scale = np.tile([[192.0, 256.0]], (boxes, 1))
    kernels = (3, 5, 7, 9, 11, 13, 15)
    cache = HeatmapCache(
        Path("."), plain.numpy(), mirrored.numpy(), np.arange(boxes), center, scale,
        np.ones(boxes), np.ones(boxes), info={"stride": 4.0, "det_file": None},
    )  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []

    def per_1000(run) -> float:
        run()  # warm-up (first-call allocations)
        start = time.perf_counter()
        run()
        return (time.perf_counter() - start) / boxes * 1000

    def batched(decode):
        def run():
            for first in range(0, boxes, 64):
                part = slice(first, first + 64)
                decode(plain[part], mirrored[part], center[part], scale[part])

        return run

    try:
        before = {}
        for mode in ("shift", "exact"):
            before[mode] = per_1000(
                batched(lambda p, m, c, s, mode=mode: _decode_before(p, m, c, s, mode, 11))
            )
            rows.append(
                (f"before: flip `{mode}` + average + DARK (kernel 11), every trial", before[mode], 0.0)
            )
        for mode in ("shift", "exact"):
            seconds = per_1000(
                batched(lambda p, m, c, s, mode=mode: decode_heatmaps(p, m, c, s, mode, 4.0, 11))
            )
            rows.append((f"now, the same decoding of one (flip `{mode}`, kernel 11)", seconds, 0.0))
        passes = {}
        for mode in ("shift", "exact"):
            passes[mode] = per_1000(lambda mode=mode: cache.decode(mode, kernels, 64))
            rows.append(
                (f"now: one pass of flip `{mode}` for all 7 kernels (once per sweep)", passes[mode], 0.0)
            )
        # A trial of a decoded flip mode: read the (mode, kernel) keypoints of 45,000 boxes, select its boxes.
        with tempfile.TemporaryDirectory(prefix="bench_decoded_") as tmp:
            path = Path(tmp) / "flip-shift-k11.npz"
            rng = np.random.default_rng(3)
            keypoints = rng.uniform(0, 640, size=(45000, 133, 2)).astype(np.float32)
            _write_decoded(path, keypoints, rng.uniform(size=(45000, 133)).astype(np.float32))
            selected = np.flatnonzero(rng.uniform(size=45000) >= 0.2)
            samples = []
            for _ in range(3):
                start = time.perf_counter()
                read = _read_decoded(path)
                read[0][selected], read[1][selected]
                samples.append(time.perf_counter() - start)
            hit = float(np.median(samples))
        rows.append(("now: a trial of a decoded flip mode (read 45,000 boxes' keypoints, select)", None, hit))
    finally:
        torch.set_num_threads(threads)
    out = []
    for what, seconds, _ in rows:
        out.append((what, seconds, seconds * 45 if seconds is not None else hit))
    # A sweep of `trials` trials over the three flip modes, per trial: before, every trial decodes; now,
    # three passes (exact's cost for it, shift's for the other two) and a read per trial.
    mean_before = (2 * before["shift"] + before["exact"]) / 3 * 45
    now = ((2 * passes["shift"] + passes["exact"]) * 45 + trials * hit) / trials
    out.append((f"before: decoding per trial of a {trials}-trial sweep (3 flip modes)", None, mean_before))
    out.append((f"now: decoding per trial of a {trials}-trial sweep, the passes shared", None, now))
    return out


def run_cli(checkpoint: Path, samples: int, work: Path, space: str = "eval_space.yaml") -> dict:
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
        str(ROOT / "search_spaces" / space),
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
    short = [c.data.metrics.get("eval/cache_short_images", 0.0) for c in children]
    summary = Path(parent.data.tags["fowkal.sweep_dir"]) / "summary.md"
    return {
        "wall": wall,
        "metrics": dict(parent.data.metrics),
        "children": len(children),
        "statuses": sorted({c.info.status for c in children}),
        "trial_s": float(np.median(trial_s)) if trial_s else float("nan"),
        "short": max(short) if short else 0.0,
        "summary": summary.read_text() if summary.is_file() else "",
        "config": config,
    }


def sweep_section(args) -> None:
    """The tune-eval command on a smoke checkpoint and the float16 question."""
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
            ("time/cache_s", "the one forward pass (plain + mirrored, every box)"),
            ("time/tune_s", "Ray start + Tune (all trials)"),
        ):
            print(f"| {label} | {m.get(key, float('nan')):.1f} s |")
        print(
            "| one trial's evaluation (median: decode, rescoring, NMS, xtcocotools) | "
            f"{result['trial_s']:.2f} s |"
        )
        print(f"| child runs / their statuses | {result['children']} / {', '.join(result['statuses'])} |")
        for key in ("defaults/eval/wholebody_AP", "best/eval/wholebody_AP", "gain/eval/wholebody_AP"):
            print(f"| {key} (%, points) | {m.get(key, float('nan')):.2f} |")
        print()
        print(result["summary"])

        from trainer.topdown.heatmap_cache import HeatmapCache

        cache_dirs = [p for p in (work / "store" / "heatmap_cache").iterdir() if p.is_dir()]
        cache = HeatmapCache.open(cache_dirs[0])
        print(f"## float16 instead of float32 in the cache ({len(cache.image_ids)} boxes x 133 keypoints)\n")
        print("| flip mode | kernel | max shift, image px | max shift, heatmap px |\n|---|---|---|---|")
        for mode, kernel, image_px, heatmap_px in float16_error(cache):
            print(f"| {mode} | {kernel} | {image_px:.2e} | {heatmap_px:.2e} |")
        print()


def kapao_section(args) -> None:
    """``fowkal tune-eval`` over KAPAO's inference settings on a smoke KAPAO checkpoint (module docstring)."""
    with tempfile.TemporaryDirectory(prefix="bench_tune_eval_kapao_") as tmp:
        work = Path(tmp)
        checkpoint = args.checkpoint or train_smoke(args.keep or work, args.epochs, "kapao")
        load = os.getloadavg()[0]
        result = run_cli(checkpoint, args.samples, work, EVAL_SPACES["kapao"])
        m = result["metrics"]
        print(
            f"## `fowkal tune-eval --samples {args.samples}` on a smoke KAPAO checkpoint ({checkpoint.name}, "
            f"32 val images, search_spaces/kapao_eval_space.yaml; load average {load:.1f} at the start, "
            f"{os.getloadavg()[0]:.1f} at the end)\n"
        )
        print("| Measurement | Figure | Goal |\n|---|---|---|")
        print(f"| wall time of the command (Ray start-up included) | {result['wall']:.1f} s | <= 180 s |")
        for key, label in (
            ("time/checks_s", "checks (space, checkpoint, files)"),
            ("time/cache_s", "the candidate cache: one network pass per TTA mode (none, flip, scales)"),
            ("time/tune_s", "Ray start + Tune (all trials)"),
        ):
            print(f"| {label} | {m.get(key, float('nan')):.1f} s | |")
        print(f"| one trial (median: 2 NMS, fusion, scores, evaluator) | {result['trial_s']:.2f} s | |")
        print(f"| child runs / their statuses | {result['children']} / {', '.join(result['statuses'])} | |")
        print(f"| most images short of cached candidates in a trial | {result['short']:.0f} | 0 |")
        for key in ("defaults/eval/wholebody_AP", "best/eval/wholebody_AP", "gain/eval/wholebody_AP"):
            print(f"| {key} (%, points) | {m.get(key, float('nan')):.2f} | |")
        print()
        print(result["summary"])


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
    parser.add_argument("--decode-only", action="store_true", help="only the val-scale decoding rows")
    parser.add_argument(
        "--family",
        choices=tuple(SMOKE_CONFIGS),
        default="topdown_heatmap",
        help="whose smoke checkpoint and eval space (kapao: search_spaces/kapao_eval_space.yaml)",
    )
    args = parser.parse_args(argv)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}\n"
    )
    if args.family == "kapao":
        kapao_section(args)
        return
    if not args.decode_only:
        sweep_section(args)
    print(
        f"## Decoding at val scale (133 maps of 64x48 per box, one thread, load {os.getloadavg()[0]:.1f})\n"
    )
    print("| decoding | s per 1,000 boxes | s per trial at 45,000 boxes |\n|---|---|---|")
    for what, seconds, per_trial in decode_cost(trials=args.samples):
        print(f"| {what} | {'-' if seconds is None else f'{seconds:.2f}'} | {per_trial:.3g} |")
    size = 45000 * 133 * 64 * 48 * 4 * 2 / 2**30
    print(f"- cache size at val scale (45,000 boxes, plain + mirrored, float32): {size:.0f} GiB")
    print(f"\n(defaults: {EvalConfig()})")


if __name__ == "__main__":
    main()
