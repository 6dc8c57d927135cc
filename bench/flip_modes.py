"""Flip-test modes of ``trainer.topdown.codec.flip_back_heatmaps``: accuracy and AP.

1. Perfect heatmaps on the real mini COCO-WholeBody set (../shared/data/coco_wholebody_mini, GT boxes): the
   pipeline's own targets for each crop and for its mirror play the network, decoded as evaluation does
   (average with the flipped-back mirror, DARK, inverse crop affine). Per mode: image-pixel keypoint error
   (mean, p95, max), the AP of those perfect predictions, and the flip-back time on a batch of 32.
2. A smoke-trained checkpoint (``configs/smoke.yaml`` trained with the plain loop in a temporary directory,
   or ``--checkpoint``): the network runs once on the validation set (crops and mirrors), then each mode
   decodes and is scored; ``shift`` is checked against the loop's own ``predict_keypoints``.

    .venv/bin/python bench/flip_modes.py [--checkpoint CKPT.pt] [--epochs N] [--skip-train]

Prints Markdown tables (for bench/RESULTS.md, "Flip test").
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from trainer.config import load_config  # noqa: E402
from trainer.datasets.keypoints import NUM_KEYPOINTS  # noqa: E402
from trainer.evaluation.wholebody import detections_to_results, evaluate_wholebody  # noqa: E402
from trainer.topdown.codec import (  # noqa: E402
    FLIP_MODES,
    decode_dark,
    flip_back_heatmaps,
    heatmap_to_image_coords,
)
from trainer.topdown.data import PipelineConfig, WholeBodyTopDownDataset, load_wholebody_annotations  # noqa: E402

MINI = ROOT.parent / "shared" / "data" / "coco_wholebody_mini"
MINI_ANN = MINI / "test_coco_wholebody.json"
METRICS = ("wholebody/AP", "body/AP", "foot/AP", "face/AP", "hand/AP", "wholebody/AR")


def _results(image_ids, coords, scores, center, scale, heatmap_size, box_scores) -> list[dict]:
    keypoints = heatmap_to_image_coords(coords, center, scale, heatmap_size)
    areas = scale[:, 0].astype(np.float64) * scale[:, 1]
    return detections_to_results(image_ids, keypoints, np.asarray(scores), box_scores, areas)


def _decode_modes(plain: torch.Tensor, mirrored: torch.Tensor, stride: float) -> dict[str, tuple]:
    out = {}
    for mode in FLIP_MODES:
        coords, scores = decode_dark(0.5 * (plain + flip_back_heatmaps(mirrored, mode=mode, stride=stride)))
        out[mode] = (coords.numpy(), scores.numpy())
    return out


def _time_flip_back(repeats: int = 7) -> dict[str, float]:
    maps = torch.rand(32, NUM_KEYPOINTS, 64, 48)
    times = {}
    for mode in FLIP_MODES:
        flip_back_heatmaps(maps, mode=mode)
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            flip_back_heatmaps(maps, mode=mode)
            samples.append(time.perf_counter() - start)
        times[mode] = float(np.median(samples)) * 1e3
    return times


def perfect_heatmaps() -> None:
    if not MINI_ANN.is_file():
        print(f"## Perfect heatmaps: skipped, {MINI_ANN} not found (../shared is absent)\n")
        return
    config = PipelineConfig()
    plain_set = WholeBodyTopDownDataset(MINI_ANN, MINI, config=config, train=False)
    mirror_config = dataclasses.replace(
        config, flip_prob=1.0, half_body_prob=0.0, rot_prob=0.0, scale_range=(1.0, 1.0), shift_factor=0.0
    )
    mirror_set = WholeBodyTopDownDataset(MINI_ANN, MINI, config=mirror_config, train=True)
    plain = [plain_set[i] for i in range(len(plain_set))]
    mirrored = [mirror_set[i] for i in range(len(mirror_set))]
    truth_by_ann = {inst.ann_id: inst.keypoints for inst in load_wholebody_annotations(MINI_ANN).instances}
    truth = np.stack([truth_by_ann[s["ann_id"]] for s in plain])[..., :2]
    labelled = np.stack([s["target_weight"].numpy() for s in plain]) > 0
    heatmaps = torch.stack([s["heatmaps"] for s in plain])
    on_mirror = torch.stack([s["heatmaps"] for s in mirrored])
    center = torch.stack([s["center"] for s in plain]).numpy()
    scale = torch.stack([s["scale"] for s in plain]).numpy()
    image_ids = np.asarray([s["image_id"] for s in plain])
    box_scores = np.ones(len(plain))
    stride = config.input_size[0] / config.heatmap_size[0]

    decoded = {"no flip": tuple(a.numpy() for a in decode_dark(heatmaps))}
    decoded.update(_decode_modes(heatmaps, on_mirror, stride))
    times = _time_flip_back()
    print(
        f"## Perfect heatmaps, mini COCO-WholeBody ({len(plain)} GT boxes, {int(labelled.sum())} labelled "
        f"keypoints, {config.input_size[0]}x{config.input_size[1]} input, stride {stride:g})\n"
    )
    print("| decoding | mean err (img px) | p95 | max | wholebody AP | face AP | hand AP | flip-back ms/32 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (coords, scores) in decoded.items():
        image = heatmap_to_image_coords(coords, center, scale, config.heatmap_size)
        error = np.linalg.norm(image - truth, axis=-1)[labelled]
        metrics = evaluate_wholebody(
            MINI_ANN, _results(image_ids, coords, scores, center, scale, config.heatmap_size, box_scores)
        )
        ms = f"{times[name]:.1f}" if name in times else "-"
        print(
            f"| {name} | {error.mean():.4f} | {np.percentile(error, 95):.4f} | {error.max():.3f} | "
            f"{metrics['wholebody/AP']:.4f} | {metrics['face/AP']:.4f} | {metrics['hand/AP']:.4f} | {ms} |"
        )
    print()


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


@torch.no_grad()
def checkpoint_ap(checkpoint_path: Path) -> None:
    from trainer.checkpoint import load_checkpoint_model
    from trainer.evaluation.model_eval import build_eval_dataset
    from trainer.loop import resolve_datasets
    from trainer.topdown.inference import predict_keypoints, results_from_predictions

    # The project's one checkpoint loader and evaluation dataset (the run's pipeline, cache_dir,
    # gt_instances, detection file and threshold), as fowkal eval builds them.
    loaded = load_checkpoint_model(checkpoint_path)
    cfg, model = loaded.config, loaded.model.eval()
    paths = resolve_datasets(cfg.data)
    pipeline = cfg.data.pipeline
    val_set = build_eval_dataset(
        cfg, paths["val_ann"], paths["val_images"], paths["val_det"], cfg.data.det_score_thr
    )
    loader = DataLoader(val_set, batch_size=cfg.data.val_batch_size, shuffle=False, num_workers=0)
    stride = pipeline.input_size[0] / pipeline.heatmap_size[0]
    plain, mirrored, centers, scales, image_ids, box_scores = [], [], [], [], [], []
    for batch in loader:  # the network runs once: crops and mirrors
        plain.append(model(batch["image"])[0].float())
        mirrored.append(model(batch["image"].flip(-1))[0].float())
        centers.append(batch["center"].numpy())
        scales.append(batch["scale"].numpy())
        image_ids.append(np.asarray(batch["image_id"]).reshape(-1))
        box_scores.append(np.asarray(batch["bbox_score"], dtype=np.float64).reshape(-1))
    plain_maps, mirrored_maps = torch.cat(plain), torch.cat(mirrored)
    center, scale = np.concatenate(centers), np.concatenate(scales)
    image_ids, box_scores = np.concatenate(image_ids), np.concatenate(box_scores)
    heatmap_size = (plain_maps.shape[-1], plain_maps.shape[-2])

    decoded = _decode_modes(plain_maps, mirrored_maps, stride)
    rows = {}
    for mode, (coords, scores) in decoded.items():
        results = _results(image_ids, coords, scores, center, scale, heatmap_size, box_scores)
        rows[mode] = evaluate_wholebody(paths["val_ann"], results)
    # "shift" must give the numbers of the training loop's own evaluation path.
    loop_predictions = predict_keypoints(model, loader, torch.device("cpu"), flip_test=True)
    reference = evaluate_wholebody(paths["val_ann"], results_from_predictions(loop_predictions))
    assert all(abs(reference[k] - rows["shift"][k]) < 1e-9 for k in METRICS), (reference, rows["shift"])
    image_coords = {
        mode: heatmap_to_image_coords(coords, center, scale, heatmap_size)
        for mode, (coords, _) in decoded.items()
    }
    moved = np.linalg.norm(image_coords["exact"] - image_coords["shift"], axis=-1)
    print(
        f"## Smoke-trained checkpoint ({checkpoint_path.name}, epoch {loaded.epoch}, "
        f"{cfg.model.backbone}, {pipeline.input_size[0]}x{pipeline.input_size[1]}, {len(val_set)} val boxes "
        f"on {len(np.unique(image_ids))} images)\n"
    )
    print("| flip mode | " + " | ".join(METRICS) + " |")
    print("|---|" + "---|" * len(METRICS))
    for mode, metrics in rows.items():
        print(f"| {mode} | " + " | ".join(f"{metrics[k]:.4f}" for k in METRICS) + " |")
    print(
        f"\nexact vs shift: keypoints move {moved.mean():.3f} image px on average "
        f"(median {np.median(moved):.3f}, max {moved.max():.3f}); "
        f"delta wholebody AP {rows['exact']['wholebody/AP'] - rows['shift']['wholebody/AP']:+.4f}\n"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, help="evaluate this checkpoint instead of training one")
    parser.add_argument("--epochs", type=int, help="smoke training epochs (default: the smoke config's)")
    parser.add_argument("--skip-train", action="store_true", help="only the perfect-heatmap part")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"# Flip test ({platform.node()}, torch {torch.__version__}, {args.threads} thread(s))\n", flush=True
    )
    perfect_heatmaps()
    if args.skip_train and args.checkpoint is None:
        return
    if args.checkpoint is not None:
        checkpoint_ap(args.checkpoint)
        return
    with tempfile.TemporaryDirectory(prefix="flip_modes_") as directory:
        checkpoint_ap(train_smoke(Path(directory), args.epochs))


if __name__ == "__main__":
    main()
