"""``fowkal show``: predicted whole-body skeletons, two runs side by side, and heatmaps of one instance.

Skeleton view (default)
    ``fowkal show --run RUN [--run OTHER] --ann FILE --images DIR --out DIR [--n 16] [--log]`` (``--checkpoint
    CKPT`` may replace either ``--run``; the order on the command line is the left-to-right order). Every
    model predicts, with its own config, flip test and DARK, on the *ground-truth* boxes of the first ``--n``
    images of the annotation file that have labelled people, so that instances correspond between runs and
    can be scored. One PNG per image:

    - one model: ``show_<image_id>.png`` = the image with every instance's skeleton (body, feet, face, hands
      in distinct colours; keypoints with score >= ``--kpt-thr``), instance numbers at the boxes, and a
      caption band below: the model's label, then per instance its OKS per part (body, foot, face, hand,
      whole-body; COCO's OKS with the part's sigmas and the ground-truth area).
    - two models: ``compare_<image_id>.png`` = both panels side by side (``PANEL_GAP`` pixels apart). The
      ``--top-k`` labelled keypoints whose predictions moved most between the two runs are circled on the
      left panel and marked with an arrow from the left run's position to the right run's on the right
      panel: green when the right run is closer to the ground truth, red when it is farther (the paper's
      Fig. 4 red arrow, for any pair of runs).

    Size of a panel: the image's width x (image height + ``caption_band_height(1 + instances)``).

Heatmap view
    ``fowkal show ... --heatmaps PART [--instance ANN_ID]`` (PART: body, foot, face, hand, lefthand,
    righthand; default instance: the first one) writes, per model,
    ``heatmaps_<model>_ann<ANN_ID>_<PART>.png``: a grid (``HEATMAP_COLUMNS`` wide) of the network's input
    crop enlarged by the smallest integer factor that makes it at least ``HEATMAP_MIN_TILE_WIDTH`` pixels
    wide: first the crop with the part's decoded keypoints, then the maximum over the part's heatmaps,
    then each keypoint's heatmap (flip-test averaged, as evaluated), all on one colour scale (0 to the
    part's highest value) so the level of the background relative to the peak, which FWAHR targets, shows.

``--log`` uploads the PNGs as artifacts ``show/<file>`` of each ``--run`` (needs runs, not checkpoints).
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from orchestrator.eval_command import download_run_checkpoint, get_run, store_of_run
from trainer import visualize
from trainer.checkpoint import EvalError, LoadedCheckpoint, load_checkpoint_model
from trainer.inference import build_eval_dataset, select_device

SHOW_ARTIFACT_DIR = "show"
HEATMAP_PARTS: tuple[str, ...] = ("body", "foot", "face", "hand", "lefthand", "righthand")
HEATMAP_COLUMNS = 8
HEATMAP_MIN_TILE_WIDTH = 160


@dataclass
class ShowModel:
    """One model to show: the loaded checkpoint and, for ``--run``, its MLflow run id."""

    loaded: LoadedCheckpoint
    run_id: str | None = None
    label: str = ""


@dataclass
class InstancePrediction:
    """One ground-truth instance and a model's prediction for it."""

    ann_id: int
    image_id: int
    bbox: tuple[float, float, float, float]
    area: float
    ground_truth: np.ndarray  # [133, 3]
    keypoints: np.ndarray  # [133, 2] image pixels
    scores: np.ndarray  # [133]


@dataclass
class ShowOutcome:
    """Files written by ``run_show`` and the runs they were logged to."""

    files: list[Path] = field(default_factory=list)
    logged_to: list[str] = field(default_factory=list)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:60] or "model"


def heatmap_tile_scale(input_width: int) -> int:
    """Integer enlargement of the crop in the heatmap view: the smallest making it >= 160 pixels wide."""
    return max(1, math.ceil(HEATMAP_MIN_TILE_WIDTH / int(input_width)))


def load_models(
    sources: Sequence[tuple[str, str]],
    tracking_uri: str | None,
    scratch: str | os.PathLike,
    experiment: str | None = None,
) -> list[ShowModel]:
    """``[("run", RUN_ID) | ("checkpoint", PATH), ...]`` -> loaded models (runs downloaded to ``scratch``)."""
    from orchestrator import tracking

    if not 1 <= len(sources) <= 2:
        raise EvalError(f"fowkal show takes one or two models (--run / --checkpoint), got {len(sources)}")
    client, uri = None, None
    models = []
    for position, (kind, value) in enumerate(sources):
        if kind == "run":
            if client is None:
                uri = store_of_run(tracking_uri)
                client = tracking.make_client(uri)
            destination = Path(scratch) / f"model{position}"
            destination.mkdir(parents=True, exist_ok=True)
            run_id = get_run(client, value, uri, experiment).info.run_id
            loaded = download_run_checkpoint(client, run_id, uri, destination)
            models.append(ShowModel(loaded, run_id=run_id, label=f"{loaded.label} run {run_id[:8]}"))
        elif kind == "checkpoint":
            loaded = load_checkpoint_model(value)
            models.append(ShowModel(loaded, label=f"{loaded.label} {loaded.checkpoint_path.name}"))
        else:  # pragma: no cover - the CLI only builds these two kinds
            raise EvalError(f"unknown model source {kind!r}")
    return models


def select_image_ids(ann_file, image_dir, config, n: int) -> list[int]:
    """The first ``n`` images (annotation file order) with at least one ground-truth sample."""
    from trainer.data import load_wholebody_annotations

    if n < 1:
        raise EvalError(f"--n must be >= 1, got {n}")
    dataset = build_eval_dataset(config, ann_file, image_dir)
    with_samples = set(dataset.sample_ids[0].tolist())
    order = list(load_wholebody_annotations(ann_file).images)
    return [i for i in order if i in with_samples][:n]


@torch.no_grad()
def predict_instances(
    model: ShowModel,
    ann_file,
    image_dir,
    image_ids: Sequence[int],
    flip_test: bool = True,
    device: torch.device | None = None,
) -> dict[int, InstancePrediction]:
    """The model's predictions (own config, flip test, DARK) on the ground-truth boxes of ``image_ids``."""
    from torch.utils.data import DataLoader, Subset

    from trainer.data import load_wholebody_annotations
    from trainer.inference import predict_keypoints

    config = model.loaded.config
    dataset = build_eval_dataset(config, ann_file, image_dir)
    sample_images, sample_anns = dataset.sample_ids
    wanted = set(int(i) for i in image_ids)
    indices = [i for i, image_id in enumerate(sample_images.tolist()) if image_id in wanted]
    device = device if device is not None else select_device(None)[0]
    net = model.loaded.model.to(device).eval()
    loader = DataLoader(Subset(dataset, indices), batch_size=config.data.val_batch_size, shuffle=False)
    predictions = predict_keypoints(
        net, loader, device, flip_test, flip_mode=config.eval.flip_mode, blur_kernel=config.eval.blur_kernel
    )
    truth = {inst.ann_id: inst for inst in load_wholebody_annotations(ann_file).instances}
    out = {}
    for row, index in enumerate(indices):
        inst = truth[int(sample_anns[index])]
        out[inst.ann_id] = InstancePrediction(
            ann_id=inst.ann_id,
            image_id=inst.image_id,
            bbox=inst.bbox,
            area=inst.area,
            ground_truth=inst.keypoints,
            keypoints=predictions["keypoints"][row],
            scores=predictions["keypoint_scores"][row],
        )
    return out


def render_panel(
    image: np.ndarray,
    instances: Sequence[InstancePrediction],
    label: str,
    kpt_thr: float,
    marks: Sequence[tuple[np.ndarray, np.ndarray, list]] | None = None,
    arrows: bool = False,
) -> np.ndarray:
    """One model's panel: skeletons, instance numbers, optional moved-keypoint marks, OKS caption band.

    ``marks`` holds per instance ``(origins [M, 2], targets [M, 2], colours)`` for ``visualize.mark_moved``.
    """
    canvas = image
    lines = [label]
    oks_wholebody = []
    for number, inst in enumerate(instances, 1):
        canvas = visualize.draw_wholebody(canvas, inst.keypoints, inst.scores, score_thr=kpt_thr)
        oks = visualize.part_oks(inst.keypoints, inst.ground_truth, inst.area)
        oks_wholebody.append(oks["wholebody"])
        lines.append(f"#{number} {visualize.format_oks(oks)}")
    if marks is not None:
        for origins, targets, colours in marks:
            if len(colours):
                canvas = visualize.mark_moved(canvas, origins, targets, colours, arrows=arrows)
    for number, inst in enumerate(instances, 1):
        x, y = inst.bbox[0], inst.bbox[1]
        canvas = visualize.put_label(canvas, f"#{number}", (int(x) + 2, max(12, int(y) + 12)))
    finite = [v for v in oks_wholebody if np.isfinite(v)]
    if finite:
        lines[0] += f"   mean whole-body OKS {np.mean(finite):.3f}"
    return visualize.add_caption_band(canvas, lines)


def render_comparison(
    image: np.ndarray,
    per_model: Sequence[Sequence[InstancePrediction]],
    labels: Sequence[str],
    kpt_thr: float = 0.3,
    top_k: int = 5,
) -> np.ndarray:
    """One panel per model (one or two), side by side; with two, the keypoints that moved most marked."""
    if len(per_model) == 1:
        return render_panel(image, per_model[0], labels[0], kpt_thr)
    first, second = per_model
    marks_first, marks_second = [], []
    for a, b in zip(first, second, strict=True):
        labelled = a.ground_truth[:, 2] > 0
        moved = visualize.moved_keypoints(a.keypoints, b.keypoints, candidates=labelled, top_k=top_k)
        error_a = np.linalg.norm(a.keypoints[moved] - a.ground_truth[moved, :2], axis=1)
        error_b = np.linalg.norm(b.keypoints[moved] - b.ground_truth[moved, :2], axis=1)
        colours = [
            visualize.BETTER_COLOUR if eb < ea else visualize.WORSE_COLOUR
            for ea, eb in zip(error_a, error_b, strict=True)
        ]
        marks_first.append((a.keypoints[moved], a.keypoints[moved], colours))
        marks_second.append((a.keypoints[moved], b.keypoints[moved], colours))
    panels = visualize.side_by_side(
        [
            render_panel(image, first, labels[0], kpt_thr, marks_first, arrows=False),
            render_panel(image, second, labels[1], kpt_thr, marks_second, arrows=True),
        ]
    )
    return visualize.add_legend_band(
        panels,
        [
            (
                visualize.BETTER_COLOUR,
                f"right run closer to the ground truth ({top_k} keypoints that moved most)",
            ),
            (
                visualize.WORSE_COLOUR,
                "right run farther from the ground truth; arrows: left -> right position",
            ),
        ],
    )


def _read_image(image_dir, file_name: str) -> np.ndarray:
    path = Path(image_dir) / file_name
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise EvalError(f"image file {str(path)!r} is missing or unreadable")
    return image


def _write_png(path: Path, image: np.ndarray) -> Path:
    if not cv2.imwrite(str(path), image):
        raise EvalError(f"could not write {str(path)!r}")
    return path


def show_skeletons(
    models: Sequence[ShowModel],
    ann_file,
    image_dir,
    out_dir,
    n: int = 16,
    kpt_thr: float = 0.3,
    top_k: int = 5,
    flip_test: bool = True,
    device: torch.device | None = None,
) -> list[Path]:
    """Write ``show_<image_id>.png`` (one model) or ``compare_<image_id>.png`` (two) for ``n`` images."""
    from trainer.data import load_wholebody_annotations

    image_ids = select_image_ids(ann_file, image_dir, models[0].loaded.config, n)
    predictions = [predict_instances(m, ann_file, image_dir, image_ids, flip_test, device) for m in models]
    images = load_wholebody_annotations(ann_file).images
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prefix = "show" if len(models) == 1 else "compare"
    files = []
    for image_id in image_ids:
        ann_ids = [a for a, p in predictions[0].items() if p.image_id == image_id]
        per_model = [[pred[a] for a in ann_ids] for pred in predictions]
        picture = render_comparison(
            _read_image(image_dir, images[image_id].file_name),
            per_model,
            [m.label for m in models],
            kpt_thr=kpt_thr,
            top_k=top_k,
        )
        files.append(_write_png(out / f"{prefix}_{image_id}.png", picture))
    return files


@torch.no_grad()
def show_heatmaps(
    model: ShowModel,
    ann_file,
    image_dir,
    out_dir,
    part: str,
    instance: int | None = None,
    flip_test: bool = True,
    device: torch.device | None = None,
) -> Path:
    """Write ``heatmaps_<model>_ann<id>_<part>.png`` for one ground-truth instance (module docstring)."""
    from trainer.codec import decode_dark, flip_back_heatmaps
    from trainer.keypoints import COCO_WHOLEBODY_PARTS, KEYPOINT_NAMES, PART_RANGES

    if part not in HEATMAP_PARTS:
        raise EvalError(f"--heatmaps must be one of {HEATMAP_PARTS}, got {part!r}")
    indices = COCO_WHOLEBODY_PARTS[part] if part in COCO_WHOLEBODY_PARTS else tuple(range(*PART_RANGES[part]))
    config = model.loaded.config
    dataset = build_eval_dataset(config, ann_file, image_dir)
    ann_ids = dataset.sample_ids[1].tolist()
    if not ann_ids:
        raise EvalError(f"{ann_file} has no labelled, non-crowd instance to show")
    if instance is None:
        instance = ann_ids[0]
    if instance not in ann_ids:
        raise EvalError(
            f"--instance {instance} is not a labelled, non-crowd annotation id of {ann_file} "
            f"(first ids: {ann_ids[:10]})"
        )
    sample = dataset[ann_ids.index(instance)]
    device = device if device is not None else select_device(None)[0]
    net = model.loaded.model.to(device).eval()
    image = sample["image"][None].to(device)
    heatmaps = net(image)[0].float()
    if flip_test:
        mirrored = net(image.flip(-1))[0].float()
        stride = image.shape[-1] / heatmaps.shape[-1]
        heatmaps = 0.5 * (heatmaps + flip_back_heatmaps(mirrored, mode=config.eval.flip_mode, stride=stride))
    heatmaps = heatmaps.cpu()
    coords, scores = decode_dark(heatmaps, blur_kernel=config.eval.blur_kernel)
    heatmaps, coords, scores = heatmaps[0].numpy(), coords[0].numpy(), scores[0].numpy()

    # The crop as the network saw it: undo the normalisation, RGB -> BGR, enlarge.
    mean = np.asarray(config.data.pipeline.mean, dtype=np.float32)
    std = np.asarray(config.data.pipeline.std, dtype=np.float32)
    rgb = sample["image"].numpy().transpose(1, 2, 0) * std + mean
    crop = np.clip(np.round(rgb[:, :, ::-1] * 255.0), 0, 255).astype(np.uint8)
    input_w, input_h = config.data.pipeline.input_size
    factor = heatmap_tile_scale(input_w)
    crop = cv2.resize(crop, (input_w * factor, input_h * factor), interpolation=cv2.INTER_LINEAR)
    to_tile = factor * input_w / heatmaps.shape[-1]  # heatmap pixel -> enlarged crop pixel

    selected = np.asarray(indices)
    vmax = float(max(heatmaps[selected].max(), 1e-6))
    with_points = crop.copy()
    colour = visualize.PART_COLOURS.get(part, visualize.PART_COLOURS["lefthand"])
    for k in selected:
        x, y = coords[k] * to_tile
        cv2.circle(with_points, (int(round(x)), int(round(y))), 3, colour, -1, cv2.LINE_AA)
    tiles = [with_points, visualize.heatmap_overlay(crop, heatmaps[selected].max(axis=0), vmax=vmax)]
    labels = [f"ann {instance} {part}", f"max, peak {vmax:.3f}"]
    for k in selected:
        tiles.append(visualize.heatmap_overlay(crop, heatmaps[k], vmax=vmax))
        labels.append(f"{KEYPOINT_NAMES[k]} {scores[k]:.3f}")
    grid = visualize.tile_grid(tiles, labels, HEATMAP_COLUMNS)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return _write_png(out / f"heatmaps_{_slug(model.label)}_ann{instance}_{part}.png", grid)


def run_show(
    *,
    sources: Sequence[tuple[str, str]],
    ann_file: str,
    image_dir: str,
    out_dir: str,
    n: int = 16,
    log: bool = False,
    tracking_uri: str | None = None,
    heatmaps: str | None = None,
    instance: int | None = None,
    kpt_thr: float = 0.3,
    top_k: int = 5,
    flip_test: bool = True,
    experiment: str | None = None,
    print_fn: Callable[[str], None] = print,
) -> ShowOutcome:
    """What ``fowkal show`` does (module docstring); ``sources`` as for ``load_models``."""
    from orchestrator import tracking

    if log and any(kind != "run" for kind, _ in sources):
        raise EvalError("--log uploads to MLflow runs: name the models with --run, not --checkpoint")
    if instance is not None and heatmaps is None:
        raise EvalError("--instance selects the instance of the heatmap view: pass --heatmaps PART with it")
    if log:  # fail on an unknown run before any work
        uri = store_of_run(tracking_uri)
        client = tracking.make_client(uri)
        for _, run_ref in sources:
            get_run(client, run_ref, uri, experiment)
    outcome = ShowOutcome()
    with tempfile.TemporaryDirectory(prefix="fowkal_show_") as scratch:
        models = load_models(sources, tracking_uri, scratch, experiment)
        if heatmaps is not None:
            for model in models:
                outcome.files.append(
                    show_heatmaps(model, ann_file, image_dir, out_dir, heatmaps, instance, flip_test)
                )
        else:
            outcome.files = show_skeletons(models, ann_file, image_dir, out_dir, n, kpt_thr, top_k, flip_test)
    for path in outcome.files:
        print_fn(f"wrote {path}")
    if log:
        for _, run_id in sources:
            for path in outcome.files:
                client.log_artifact(run_id, str(path), SHOW_ARTIFACT_DIR)
            outcome.logged_to.append(run_id)
            print_fn(f"logged {len(outcome.files)} PNG(s) to MLflow run {run_id} under {SHOW_ARTIFACT_DIR}/")
    return outcome


__all__ = [
    "HEATMAP_COLUMNS",
    "HEATMAP_MIN_TILE_WIDTH",
    "HEATMAP_PARTS",
    "InstancePrediction",
    "SHOW_ARTIFACT_DIR",
    "ShowModel",
    "ShowOutcome",
    "heatmap_tile_scale",
    "load_models",
    "predict_instances",
    "render_comparison",
    "render_panel",
    "run_show",
    "select_image_ids",
    "show_heatmaps",
    "show_skeletons",
]
