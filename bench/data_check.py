"""``fowkal data check``: images/s per process at 1 and 2 worker processes, beside plain ``cv2.imread``.

The annotation file comes from ``bench/scale.py``'s full-size generator (the real mini annotations replicated
and jittered; image ``i`` has the size of mini image ``i % 4``: 640x425, 500x333, 640x429, 640x392). Default:
the val file's published size, 5,000 images / 7,500 people (``--split train``: 118,287 / 250,000, which takes
tens of minutes on 2 cores). The image root holds one real JPEG per image entry: ``--distinct`` (default 400)
different JPEGs, made from the four mini images (random crop scaled back to the exact size, flip, brightness,
noise; quality 90), hard-linked under every file name, so each entry is a real file of the right size and the
decoder sees 400 different images; all are read once before timing (page cache warm for every row).

Rows, each in the same run:
- baseline: plain ``cv2.imread`` of every file in this process, one thread (what any reader pays);
- the per-image checker (``trainer.datasets.image_check.check_image``: existence, the end-marker check,
  ``cv2.imread``, size) in this process, no pool;
- the command, ``fowkal data check --workers 1`` and ``--workers 2``, each a fresh process: its image phase
  (``report.json``'s seconds) and its wall time (start-up and the cached annotation read included).

Usage: ``.venv/bin/python bench/data_check.py [--out DIR] [--split val|train] [--distinct N] [--quick]``.
``--out`` (default ``/tmp/fowkal_data_check``) holds the files and the annotation cache; nothing goes into the
repository. ``--quick``: 500 images, 40 distinct JPEGs (a smoke run). Prints the load average beside each row.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for entry in (REPO, REPO / "bench"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

import cv2  # noqa: E402
from scale import FULL, MINI_ANN, MINI_DIR, write_annotation_file  # noqa: E402

FOWKAL = REPO / ".venv" / "bin" / "fowkal"


def write_distinct_jpegs(out: Path, per_source: int, seed: int = 0) -> list[list[Path]]:
    """``per_source`` different JPEGs of each mini image's exact size; ``[source][variant]`` paths."""
    out.mkdir(parents=True, exist_ok=True)
    sources = json.loads(MINI_ANN.read_text())["images"]
    rng = np.random.default_rng(seed)
    paths: list[list[Path]] = []
    for s, source in enumerate(sources):
        image = cv2.imread(str(MINI_DIR / source["file_name"]))
        height, width = image.shape[:2]
        assert (width, height) == (source["width"], source["height"]), source
        variants = []
        for v in range(per_source):
            path = out / f"s{s}_{v:04d}.jpg"
            if not path.is_file():
                scale = rng.uniform(0.7, 1.0)
                ch, cw = int(height * scale), int(width * scale)
                y0, x0 = int(rng.integers(0, height - ch + 1)), int(rng.integers(0, width - cw + 1))
                variant = cv2.resize(image[y0 : y0 + ch, x0 : x0 + cw], (width, height))
                if rng.random() < 0.5:
                    variant = variant[:, ::-1]
                noise = rng.normal(0.0, 4.0, size=variant.shape)
                variant = np.clip(variant * rng.uniform(0.8, 1.2) + noise, 0, 255).astype(np.uint8)
                cv2.imwrite(str(path), variant, [cv2.IMWRITE_JPEG_QUALITY, 90])
            variants.append(path)
        paths.append(variants)
    return paths


def build_image_root(root: Path, num_images: int, variants: list[list[Path]]) -> None:
    """``{image_id:012d}.jpg`` for every image id, hard-linked to a variant of its source's size."""
    marker = root / f".complete_{num_images}_{len(variants[0])}"
    if marker.is_file():
        return
    root.mkdir(parents=True, exist_ok=True)
    for image_id in range(1, num_images + 1):
        source = (image_id - 1) % len(variants)
        variant = variants[source][((image_id - 1) // len(variants)) % len(variants[source])]
        target = root / f"{image_id:012d}.jpg"
        if target.exists():
            target.unlink()
        os.link(variant, target)
    marker.touch()


def _load() -> str:
    return "/".join(f"{value:.1f}" for value in os.getloadavg())


def time_baseline(rows: list[tuple[str, int, int, int]], image_dir: Path) -> dict:
    start, cpu = time.perf_counter(), time.process_time()
    for file_name, _, _, _ in rows:
        image = cv2.imread(str(image_dir / file_name), cv2.IMREAD_COLOR)
        assert image is not None
    return {"seconds": time.perf_counter() - start, "cpu": time.process_time() - cpu}


def time_checker(rows: list[tuple[str, int, int, int]], image_dir: Path) -> dict:
    from trainer.datasets.image_check import check_image

    start, cpu = time.perf_counter(), time.process_time()
    for file_name, image_id, width, height in rows:
        result = check_image(str(image_dir), file_name, image_id, width, height)
        assert result.ok, result
    return {"seconds": time.perf_counter() - start, "cpu": time.process_time() - cpu}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_command(ann: Path, image_dir: Path, workers: int, out: Path) -> dict:
    """The command in a fresh process; its CPU time includes its pool workers' and its start-up's."""
    start, cpu = time.perf_counter(), _children_cpu()
    done = subprocess.run(
        [str(FOWKAL), "data", "check", "--ann", str(ann), "--images", str(image_dir)]
        + ["--workers", str(workers), "--out", str(out), "--no-progress"],
        capture_output=True,
        text=True,
    )
    wall, cpu = time.perf_counter() - start, _children_cpu() - cpu
    if done.returncode != 0:
        raise SystemExit(f"fowkal data check exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    report = json.loads((out / "report.json").read_text())
    assert report["checked"] > 0 and report["clean"], report
    return {"wall": wall, "seconds": report["seconds"], "cpu": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/fowkal_data_check"))
    parser.add_argument("--split", choices=["val", "train"], default="val")
    parser.add_argument("--distinct", type=int, default=400, help="different JPEGs behind the file names")
    parser.add_argument("--repeats", type=int, default=2, help="runs of every row, interleaved")
    parser.add_argument("--quick", action="store_true", help="500 images, 40 distinct JPEGs (smoke run)")
    options = parser.parse_args()
    num_images, num_anns = FULL[f"{options.split}_images"], FULL[f"{options.split}_anns"]
    distinct = options.distinct
    if options.quick:
        num_images, num_anns, distinct = 500, 750, 40
    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    os.environ["XDG_CACHE_HOME"] = str(out / "xdg_cache")  # the command's annotation cache, here

    ann = out / f"{options.split}_{num_images}_{num_anns}.json"
    if not ann.is_file():
        write_annotation_file(ann, num_images, num_anns, seed=1)
    variants = write_distinct_jpegs(out / "distinct", max(1, distinct // 4))
    image_dir = out / f"images_{num_images}"
    build_image_root(image_dir, num_images, variants)

    from trainer.datasets.annotations import load_wholebody_annotations

    start = time.perf_counter()
    annotations = load_wholebody_annotations(ann)  # converts once into the cache the command then maps
    convert_seconds = time.perf_counter() - start
    rows = [
        (str(name), int(i), int(w), int(h))
        for i, name, w, h in zip(
            annotations.image_ids,
            annotations.file_names,
            annotations.image_widths,
            annotations.image_heights,
            strict=True,
        )
    ]
    for variant in (path for source in variants for path in source):  # page cache warm
        variant.read_bytes()
    cv2.setNumThreads(0)

    measurements = [
        ("baseline: plain `cv2.imread`, this process", 1, lambda: time_baseline(rows, image_dir)),
        (
            "`check_image` (end marker + imread + size), this process",
            1,
            lambda: time_checker(rows, image_dir),
        ),
    ] + [
        (
            f"`fowkal data check --workers {workers}`",
            workers,
            lambda workers=workers: run_command(ann, image_dir, workers, out / f"report_w{workers}"),
        )
        for workers in (1, 2)
    ]
    results: dict[str, list[dict]] = {name: [] for name, _, _ in measurements}
    startup: list[dict] = []
    for _ in range(options.repeats):  # interleaved, so a change of load hits every row alike
        # The command's start-up (imports, 4 images): its CPU time is taken off the command rows' CPU.
        startup.append(run_command(MINI_ANN, MINI_DIR, 1, out / "report_startup"))
        for name, processes, measure in measurements:
            load = _load()
            result = measure()
            result["load"] = load
            result["per_process"] = len(rows) / result["seconds"] / processes
            results[name].append(result)
    startup_cpu = float(np.median([run["cpu"] for run in startup]))
    for name, _, _ in measurements:
        for result in results[name]:
            image_cpu = result["cpu"] - (startup_cpu if "wall" in result else 0.0)
            result["per_cpu_second"] = len(rows) / image_cpu

    print(
        f"Settings: {options.split} size, {len(rows):,} images / {len(annotations.ann_ids):,} annotations "
        f"({ann.stat().st_size / 2**20:.0f} MiB JSON, first conversion {convert_seconds:.1f} s), "
        f"{distinct} distinct JPEGs hard-linked; {os.cpu_count()} CPUs; files under {out}; the command's "
        f"start-up (4 mini images) {startup_cpu:.1f} CPU-s, "
        f"{float(np.median([run['wall'] for run in startup])):.1f} s wall"
        + (" [QUICK]" if options.quick else "")
    )
    print()
    print(
        "| Row | processes | images/s per process, median (each run) | images per CPU-s (start-up off) | "
        "image phase, s | command wall, s | load 1/5/15 before |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, processes, _ in measurements:
        runs = results[name]
        rates = [run["per_process"] for run in runs]
        walls = ", ".join(f"{run['wall']:.1f}" for run in runs if run.get("wall") is not None)
        phases = ", ".join(f"{run['seconds']:.1f}" for run in runs)
        print(
            f"| {name} | {processes} | {np.median(rates):.0f} ({', '.join(f'{r:.0f}' for r in rates)}) | "
            f"{np.median([run['per_cpu_second'] for run in runs]):.0f} | {phases} | {walls} | "
            f"{'; '.join(run['load'] for run in runs)} |"
        )
    print(f"load average after: {_load()}")


if __name__ == "__main__":
    main()
