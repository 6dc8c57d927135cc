"""Full-size COCO-WholeBody: annotation loading, dataset start-up, val-scale evaluation, loader headroom.

Generates, without images, files of the published sizes by replicating and jittering the real annotations of
``../shared/data/coco_wholebody_mini/`` (so keypoint counts, part validity, segmentation polygons and field
layout are the real ones): a train file of 118,287 images and 250,000 annotations, a val file of 5,000 images
and 7,500 people, and 45,000 person detections on the val images. Then measures, each in a fresh process:

- ``load_wholebody_annotations``: first load (JSON -> per-node cache) and cached load: time and peak RSS;
- ``WholeBodyTopDownDataset`` construction from the cache, including the image-existence check against an
  image root of 118,287 empty files: time and added private memory (``psutil`` USS);
- 8 concurrent processes constructing the same dataset: added private and shared memory of each;
- val-scale evaluation: rescoring + OKS-NMS of 45,000 detections (``detections_to_results``) and the six
  passes (``WholeBodyEvaluator.evaluate``) with the numpy engine, against the xtcocotools engine in the same
  process (parallel and serial) as the baseline, with the largest difference of any statistic;
- the pickled size of the predictions dict that ``all_gather_object`` moves at val scale;
- DataLoader headroom: samples/s of one loader process (real COCO JPEG decode + augmentation + warp + DARK
  targets at 256x192, the four mini images cycled, one thread) and the loader processes a GPU needs.

Usage: ``.venv/bin/python bench/scale.py [--out DIR] [--quick] [--only val]``. ``--out`` (default
``/tmp/fowkal_scale``) holds the generated files and the annotation cache; nothing is written into the
repository. ``--quick`` shrinks every size 20x (a smoke run, not the goals). ``--only val`` generates and
measures only the val rows. The table prints the settings, the figures and the goals beside them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MINI_DIR = REPO.parent / "shared" / "data" / "coco_wholebody_mini"
MINI_ANN = MINI_DIR / "test_coco_wholebody.json"
KEYPOINT_FIELDS = ("keypoints", "foot_kpts", "face_kpts", "lefthand_kpts", "righthand_kpts")

# The published COCO-WholeBody v1.0 sizes (train / val) and the AP_H 56 person detections on val.
FULL = {
    "train_images": 118_287,
    "train_anns": 250_000,
    "val_images": 5_000,
    "val_anns": 7_500,
    "dets": 45_000,
}
CONCURRENT_WORKERS = 8
GPU_RATES = (200, 400, 800, 1600)  # img/s a training GPU might consume, for the loader-process column


# ------------------------------------------------------------------------------------------- generation


def _jittered(annotation: dict, rng: np.random.Generator, width: int, height: int) -> dict:
    """Copy of a real annotation with its labelled keypoints and box moved by a few pixels."""
    out = dict(annotation)
    dx, dy = rng.normal(0.0, 3.0, size=2)
    for field in KEYPOINT_FIELDS:
        values = np.asarray(annotation[field], dtype=np.float64).reshape(-1, 3).copy()
        labelled = values[:, 2] > 0
        noise = rng.normal(0.0, 1.0, size=(int(labelled.sum()), 2))
        values[labelled, 0] = np.clip(values[labelled, 0] + dx + noise[:, 0], 0, width - 1)
        values[labelled, 1] = np.clip(values[labelled, 1] + dy + noise[:, 1], 0, height - 1)
        out[field] = [round(float(v), 2) for v in values.reshape(-1)]
    x, y, w, h = annotation["bbox"]
    out["bbox"] = [
        round(float(np.clip(x + dx, 0, width - 1)), 2),
        round(float(np.clip(y + dy, 0, height - 1)), 2),
        round(float(w), 2),
        round(float(h), 2),
    ]
    return out


def write_annotation_file(path: Path, num_images: int, num_anns: int, seed: int) -> dict:
    """A COCO-WholeBody v1.0 file of ``num_images`` images and ``num_anns`` annotations, written streaming.

    Image ``i`` copies the size of mini image ``i % 4`` and holds jittered copies of that image's real
    annotations (cycled), ``num_anns / num_images`` per image on average. Returns ``{image_id: source}``
    sizes for the detections.
    """
    mini = json.loads(MINI_ANN.read_text())
    sources = mini["images"]
    by_image: dict[int, list[dict]] = {}
    for annotation in mini["annotations"]:
        by_image.setdefault(annotation["image_id"], []).append(annotation)
    rng = np.random.default_rng(seed)
    per_image = np.full(num_images, num_anns // num_images)
    per_image[: num_anns - int(per_image.sum())] += 1
    tmp = path.with_suffix(".tmp")
    ann_id = 1
    sizes = {}
    with open(tmp, "w") as handle:
        handle.write('{"info": {"description": "bench/scale.py"}, "licenses": [], ')
        handle.write('"categories": ' + json.dumps(mini["categories"]) + ', "images": [')
        for image_id in range(1, num_images + 1):
            source = sources[(image_id - 1) % len(sources)]
            sizes[image_id] = (source["width"], source["height"])
            entry = {
                "license": 1,
                "file_name": f"{image_id:012d}.jpg",
                "height": source["height"],
                "width": source["width"],
                "id": image_id,
            }
            handle.write(("" if image_id == 1 else ", ") + json.dumps(entry))
        handle.write('], "annotations": [')
        for image_id in range(1, num_images + 1):
            source = sources[(image_id - 1) % len(sources)]
            real = by_image[source["id"]]
            for j in range(int(per_image[image_id - 1])):
                annotation = _jittered(
                    real[(image_id + j) % len(real)], rng, source["width"], source["height"]
                )
                annotation["id"] = ann_id
                annotation["image_id"] = image_id
                handle.write(("" if ann_id == 1 else ", ") + json.dumps(annotation))
                ann_id += 1
        handle.write("]}")
    os.replace(tmp, path)
    return sizes


def write_detections(path: Path, ann_path: Path, num_dets: int, seed: int) -> None:
    """``num_dets`` person detections: jittered GT boxes (high scores) and random boxes (low scores)."""
    data = json.loads(ann_path.read_text())
    sizes = {image["id"]: (image["width"], image["height"]) for image in data["images"]}
    rng = np.random.default_rng(seed)
    boxes = [(a["image_id"], a["bbox"]) for a in data["annotations"]]
    detections = []
    for index in range(num_dets):
        if index < 3 * len(boxes):  # three boxes per person, as a detector's near-duplicates
            image_id, (x, y, w, h) = boxes[index % len(boxes)]
            jitter = rng.normal(0.0, 0.05, size=4) * [w, h, w, h]
            box = [x + jitter[0], y + jitter[1], max(w + jitter[2], 1.0), max(h + jitter[3], 1.0)]
            score = float(rng.uniform(0.3, 1.0))
        else:
            image_id = int(rng.integers(1, len(sizes) + 1))
            width, height = sizes[image_id]
            w, h = rng.uniform(20, width / 2), rng.uniform(20, height / 2)
            box = [rng.uniform(0, width - w), rng.uniform(0, height - h), w, h]
            score = float(rng.uniform(0.0, 0.3))
        detections.append(
            {
                "image_id": image_id,
                "category_id": 1,
                "bbox": [round(float(v), 2) for v in box],
                "score": score,
            }
        )
    path.write_text(json.dumps(detections))


def generate(out: Path, sizes: dict, train: bool = True) -> dict[str, Path]:
    """Write (or reuse) the full-size files and an image root of empty files under ``out`` (with ``train``
    false only the val files and the detections)."""
    out.mkdir(parents=True, exist_ok=True)
    tag = f"{sizes['train_images']}_{sizes['train_anns']}"
    paths = {
        "train_ann": out / f"train_{tag}.json",
        "val_ann": out / f"val_{sizes['val_images']}_{sizes['val_anns']}.json",
        "det": out / f"det_{sizes['dets']}.json",
        "train_images": out / f"train_images_{sizes['train_images']}",
    }
    if train and not paths["train_ann"].is_file():
        write_annotation_file(paths["train_ann"], sizes["train_images"], sizes["train_anns"], seed=0)
    if not paths["val_ann"].is_file():
        write_annotation_file(paths["val_ann"], sizes["val_images"], sizes["val_anns"], seed=1)
    if not paths["det"].is_file():
        write_detections(paths["det"], paths["val_ann"], sizes["dets"], seed=2)
    root = paths["train_images"]
    if train and not (root / ".complete").is_file():
        root.mkdir(exist_ok=True)
        for image_id in range(1, sizes["train_images"] + 1):
            open(root / f"{image_id:012d}.jpg", "wb").close()
        (root / ".complete").touch()
    return paths


# ---------------------------------------------------------------------------------- child measurements


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _memory_mb(pid: int | None = None) -> dict[str, float]:
    """USS, PSS, RSS and shared of a process (psutil memory_full_info), MiB."""
    import psutil

    info = psutil.Process(pid).memory_full_info()
    return {
        "uss": info.uss / 2**20,
        "pss": info.pss / 2**20,
        "rss": info.rss / 2**20,
        "shared": info.shared / 2**20,
    }


def child_load(args: dict) -> dict:
    from trainer.topdown.data import load_wholebody_annotations

    before = _memory_mb()
    start = time.perf_counter()
    annotations = load_wholebody_annotations(args["ann"], cache_dir=args["cache"])
    seconds = time.perf_counter() - start
    after = _memory_mb()
    return {
        "seconds": seconds,
        "peak_mb": _peak_mb(),
        "added_uss_mb": after["uss"] - before["uss"],
        "annotations": len(annotations.ann_ids),
    }


def child_dataset(args: dict) -> dict:
    from trainer.topdown.data import WholeBodyTopDownDataset

    before = _memory_mb()
    start = time.perf_counter()
    dataset = WholeBodyTopDownDataset(args["ann"], args["images"], cache_dir=args["cache"])
    seconds = time.perf_counter() - start
    after = _memory_mb()
    out = {"seconds": seconds, "samples": len(dataset), "added_uss_mb": after["uss"] - before["uss"]}
    if args.get("touch"):  # read every keypoint once, as an epoch does (the pages become resident, shared)
        keypoints = dataset._annotations.keypoints
        total = 0.0
        for start_row in range(0, len(keypoints), 8192):
            total += float(np.asarray(keypoints[start_row : start_row + 8192, :, 2]).sum())
        out["touched"] = total
    if args.get("hold"):  # stay alive until the parent has measured all workers
        Path(args["ready"]).touch()
        while not Path(args["release"]).exists():
            time.sleep(0.05)
        out["baseline"] = before
    return out


def val_predictions(val_ann: Path, det_file: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """What ``predict_keypoints`` returns for every detection: the GT of the detection's person with a few
    pixels of noise (random keypoints inside the box for the background boxes), random keypoint scores."""
    data = json.loads(val_ann.read_text())
    people = [
        np.concatenate([np.asarray(a[f], dtype=np.float64).reshape(-1, 3) for f in KEYPOINT_FIELDS])
        for a in data["annotations"]
    ]
    detections = json.loads(det_file.read_text())
    rng = np.random.default_rng(seed)
    keypoints = np.empty((len(detections), 133, 2), dtype=np.float32)
    for index, det in enumerate(detections):
        x, y, w, h = det["bbox"]
        if index < 3 * len(people):
            keypoints[index] = people[index % len(people)][:, :2] + rng.normal(0.0, 3.0, size=(133, 2))
        else:
            keypoints[index] = rng.uniform([x, y], [x + w, y + h], size=(133, 2))
    boxes = np.asarray([d["bbox"] for d in detections], dtype=np.float64)
    aspect = 192 / 256
    w = np.maximum(boxes[:, 2], boxes[:, 3] * aspect) * 1.25
    return {
        "image_ids": np.asarray([d["image_id"] for d in detections], dtype=np.int64),
        "keypoints": keypoints,
        "keypoint_scores": rng.uniform(0.0, 1.0, size=(len(detections), 133)).astype(np.float32),
        "box_scores": np.asarray([d["score"] for d in detections], dtype=np.float64),
        "areas": w * (w / aspect),
    }


def child_val(args: dict) -> dict:
    from trainer.evaluation.wholebody import WholeBodyEvaluator, detections_to_results

    predictions = val_predictions(Path(args["val_ann"]), Path(args["det"]))
    gathered_bytes = len(pickle.dumps(predictions, protocol=pickle.HIGHEST_PROTOCOL))
    start = time.perf_counter()
    results = detections_to_results(
        predictions["image_ids"],
        predictions["keypoints"],
        predictions["keypoint_scores"],
        predictions["box_scores"],
        predictions["areas"],
    )
    nms_seconds = time.perf_counter() - start
    start = time.perf_counter()
    evaluator = WholeBodyEvaluator(args["val_ann"])
    parse_seconds = time.perf_counter() - start
    start = time.perf_counter()
    ours = evaluator.evaluate(results)
    numpy_seconds = time.perf_counter() - start
    # The baseline: the xtcocotools engine on the same results, forked passes and one process.
    start = time.perf_counter()
    reference = WholeBodyEvaluator(args["val_ann"], engine="xtcocotools")
    reference_parse_seconds = time.perf_counter() - start
    start = time.perf_counter()
    parallel = reference.evaluate(results)
    parallel_seconds = time.perf_counter() - start
    reference.processes = 1
    start = time.perf_counter()
    serial = reference.evaluate(results)
    serial_seconds = time.perf_counter() - start
    return {
        "detections": len(predictions["image_ids"]),
        "results": len(results),
        "gathered_mb": gathered_bytes / 2**20,
        "nms_seconds": nms_seconds,
        "parse_seconds": parse_seconds,
        "numpy_seconds": numpy_seconds,
        "reference_parse_seconds": reference_parse_seconds,
        "parallel_seconds": parallel_seconds,
        "serial_seconds": serial_seconds,
        "processes": min(6, os.cpu_count() or 1),
        "max_difference": max(abs(ours[k] - serial[k]) for k in serial),
        "max_difference_parallel": max(abs(parallel[k] - serial[k]) for k in serial),
        "wholebody_AP": ours["wholebody/AP"],
    }


def child_headroom(args: dict) -> dict:
    import cv2
    import torch

    from trainer.topdown.data import WholeBodyTopDownDataset

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    torch.manual_seed(0)
    dataset = WholeBodyTopDownDataset(MINI_ANN, MINI_DIR, train=True, cache_dir=args["cache"])
    for index in range(len(dataset)):  # warm-up: page cache, allocator
        dataset[index]
    count = args["samples"]
    start = time.perf_counter()
    for index in range(count):
        dataset[index % len(dataset)]
    seconds = time.perf_counter() - start
    size = dataset.config.input_size
    return {"samples_per_s": count / seconds, "samples": count, "input": f"{size[1]}x{size[0]}"}


CHILDREN = {"load": child_load, "dataset": child_dataset, "val": child_val, "headroom": child_headroom}


def run_child(name: str, args: dict) -> dict:
    """One measurement in a fresh interpreter (clean peak RSS, no state from earlier measurements)."""
    output = subprocess.run(
        [sys.executable, __file__, "--child", name, json.dumps(args)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(output.stdout.strip().splitlines()[-1])


def run_concurrent(args: dict, workers: int) -> dict:
    """``workers`` processes construct the same cached dataset and read every keypoint; measured together."""
    import psutil

    scratch = Path(tempfile.mkdtemp(prefix="fowkal_scale_workers_"))
    release = scratch / "release"
    procs = []
    for index in range(workers):
        child_args = dict(
            args, touch=True, hold=True, ready=str(scratch / f"ready{index}"), release=str(release)
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, "--child", "dataset", json.dumps(child_args)],
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    start = time.perf_counter()
    while not all((scratch / f"ready{i}").exists() for i in range(workers)):
        if any(p.poll() not in (None, 0) for p in procs):
            raise RuntimeError("a concurrent worker failed")
        time.sleep(0.1)
    all_ready = time.perf_counter() - start
    memory = [_memory_mb(p.pid) for p in procs]
    total_system_used = psutil.virtual_memory().used / 2**20
    release.touch()
    outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    shutil.rmtree(scratch, ignore_errors=True)
    added = [m["uss"] - o["baseline"]["uss"] for m, o in zip(memory, outs, strict=True)]
    return {
        "workers": workers,
        "all_ready_s": all_ready,
        "added_private_mb": added,
        "uss_mb": [m["uss"] for m in memory],
        "shared_mb": [m["shared"] for m in memory],
        "pss_mb": [m["pss"] for m in memory],
        "system_used_mb": total_system_used,
    }


# ------------------------------------------------------------------------------------------------ table


def _row(what: str, figure: str, goal: str = "", met: bool | None = None) -> str:
    verdict = "" if met is None else ("met" if met else "NOT met")
    return f"| {what} | {figure} | {goal} | {verdict} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/fowkal_scale"))
    parser.add_argument("--quick", action="store_true", help="every size / 20 (smoke run, not the goals)")
    parser.add_argument("--samples", type=int, default=600, help="samples timed for the loader headroom")
    parser.add_argument("--only", choices=["val"], help="measure only these rows (and generate their files)")
    options = parser.parse_args()
    sizes = {k: max(1, v // 20) for k, v in FULL.items()} if options.quick else dict(FULL)
    sizes["train_anns"] = max(sizes["train_anns"], sizes["train_images"])
    start = time.perf_counter()
    paths = generate(options.out, sizes, train=options.only is None)
    generate_seconds = time.perf_counter() - start
    if options.only == "val":
        val = run_child("val", {"val_ann": str(paths["val_ann"]), "det": str(paths["det"])})
        print(
            f"Settings: val {sizes['val_images']:,} images / {sizes['val_anns']:,} people, "
            f"{sizes['dets']:,} detections; {os.cpu_count()} CPUs; files under {options.out}"
            + (" [QUICK: not the goals]" if options.quick else "")
        )
        print()
        print("| Measurement | Figure | Goal | |")
        print("|---|---|---|---|")
        _print_val_rows(val)
        return
    cache = options.out / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    common = {"ann": str(paths["train_ann"]), "images": str(paths["train_images"]), "cache": str(cache)}

    first = run_child("load", common)
    cached = run_child("load", common)
    dataset = run_child("dataset", common)
    concurrent = run_concurrent(common, CONCURRENT_WORKERS)
    val = run_child("val", {"val_ann": str(paths["val_ann"]), "det": str(paths["det"])})
    headroom = run_child("headroom", {"cache": str(cache), "samples": options.samples})

    size_mb = paths["train_ann"].stat().st_size / 2**20
    print(
        f"Settings: train {sizes['train_images']:,} images / {sizes['train_anns']:,} annotations "
        f"({size_mb:.0f} MiB JSON), val {sizes['val_images']:,} images / {sizes['val_anns']:,} people, "
        f"{sizes['dets']:,} detections; {os.cpu_count()} CPUs; files under {options.out} "
        f"(generated or reused in {generate_seconds:.0f} s)"
        + (" [QUICK: not the goals]" if options.quick else "")
    )
    print()
    print("| Measurement | Figure | Goal | |")
    print("|---|---|---|---|")
    print(
        _row(
            "first load (JSON -> cache), time", f"{first['seconds']:.1f} s", "<= 30 s", first["seconds"] <= 30
        )
    )
    print(
        _row(
            "first load, peak RSS",
            f"{first['peak_mb'] / 1024:.2f} GiB",
            "<= 3 GB",
            first["peak_mb"] <= 3e9 / 2**20,
        )
    )
    print(_row("cached load, time", f"{cached['seconds']:.2f} s"))
    print(
        _row(
            "cached load, peak RSS / added private (USS)",
            f"{cached['peak_mb']:.0f} / {cached['added_uss_mb']:.0f} MiB",
        )
    )
    print(
        _row(
            "cached `WholeBodyTopDownDataset` (incl. image check), time",
            f"{dataset['seconds']:.2f} s ({dataset['samples']:,} samples)",
            "<= 2 s",
            dataset["seconds"] <= 2,
        )
    )
    print(
        _row(
            "cached dataset, added private memory (USS)",
            f"{dataset['added_uss_mb']:.0f} MiB",
            "<= 300 MB",
            dataset["added_uss_mb"] <= 300e6 / 2**20,
        )
    )
    added = concurrent["added_private_mb"]
    print(
        _row(
            f"{concurrent['workers']} concurrent processes, added private (USS) in total",
            f"{sum(added):.0f} MiB (each {min(added):.0f}-{max(added):.0f})",
            "<= 1.5 GB",
            sum(added) <= 1.5e9 / 2**20,
        )
    )
    print(
        _row(
            f"{concurrent['workers']} concurrent processes, shared RSS each / PSS each",
            f"{min(concurrent['shared_mb']):.0f}-{max(concurrent['shared_mb']):.0f} / "
            f"{min(concurrent['pss_mb']):.0f}-{max(concurrent['pss_mb']):.0f} MiB "
            f"(all ready in {concurrent['all_ready_s']:.1f} s)",
        )
    )
    _print_val_rows(val)
    rate = headroom["samples_per_s"]
    print(
        _row(
            f"loader process: JPEG decode + augmentation + warp + targets at {headroom['input']}",
            f"{rate:.0f} samples/s",
            ">= 150 samples/s",
            rate >= 150,
        )
    )
    needs = ", ".join(f"{gpu} img/s: {math.ceil(gpu / rate)}" for gpu in GPU_RATES)
    print(_row("loader processes per GPU training at N img/s", needs))


def _print_val_rows(val: dict) -> None:
    print(
        _row(
            "val: rescoring + OKS-NMS",
            f"{val['nms_seconds']:.2f} s ({val['detections']:,} -> {val['results']:,})",
        )
    )
    print(
        _row(
            "val: parse the annotation file (once per run), numpy / xtcocotools engine",
            f"{val['parse_seconds']:.2f} / {val['reference_parse_seconds']:.2f} s",
        )
    )
    total = val["nms_seconds"] + val["numpy_seconds"]
    print(
        _row(
            "val: six passes, numpy engine (+ NMS)",
            f"{val['numpy_seconds']:.2f} s ({total:.2f} s)",
            "<= 10 s",
            total <= 10,
        )
    )
    total_parallel = val["nms_seconds"] + val["parallel_seconds"]
    print(
        _row(
            f"val: six xtcocotools passes, {val['processes']} processes (+ NMS), baseline",
            f"{val['parallel_seconds']:.2f} s ({total_parallel:.2f} s)",
        )
    )
    print(
        _row(
            "val: six xtcocotools passes, one process",
            f"{val['serial_seconds']:.2f} s (max difference to the numpy engine {val['max_difference']:.1e}, "
            f"to {val['processes']} processes {val['max_difference_parallel']:.1e})",
        )
    )
    print(_row("val: predictions moved by all_gather_object (pickled)", f"{val['gathered_mb']:.1f} MiB"))


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--child":
        print(json.dumps(CHILDREN[sys.argv[2]](json.loads(sys.argv[3]))))
    else:
        main()
