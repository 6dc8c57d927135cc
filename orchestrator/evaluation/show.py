"""``fowkal show``: predicted whole-body skeletons, two runs side by side, and heatmaps of one instance.

Skeleton view (default)
    ``fowkal show --run RUN [--run OTHER] --ann FILE --images DIR --out DIR [--n 16] [--log]`` (``--checkpoint
    CKPT`` may replace either ``--run``; the order on the command line is the left-to-right order). Every
    model predicts with its own config through its family (``trainer.families``: ``eval_dataset``,
    ``predict``, ``results``) on the first ``--n`` images of the annotation file that have labelled people;
    the top-down family predicts on the *ground-truth* boxes (flip test and DARK), one pose per instance,
    and the poses of a family that finds people itself are matched to the ground-truth instances by OKS, so
    that instances correspond between runs and can be scored. One PNG per image:

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

Heatmap view (families whose network outputs heatmaps of person crops: the top-down family)
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

import dataclasses
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

from orchestrator.evaluation.run_lookup import download_run_checkpoint, get_run, store_of_run
from trainer.checkpoint import EvalError, LoadedCheckpoint, load_checkpoint_model
from trainer.datasets.keypoints import ANNOTATION_KEYPOINT_FIELDS, NUM_KEYPOINTS
from trainer.evaluation import visualize
from trainer.evaluation.model_eval import build_eval_dataset, select_device
from trainer.families import family_of

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


def _has_heatmap_view(family) -> bool:
    """Whether the heatmap view can show ``family``'s models: their network outputs heatmaps of person crops
    that ``trainer.topdown.codec`` decodes (what ``fowkal tune-eval`` caches and sweeps:
    ``heatmap_eval_sweep``)."""
    return bool(family.heatmap_eval_sweep)


def _predicts_per_box(family, dataset) -> bool:
    """Whether ``family``'s prediction rows are the samples of its eval ``dataset``, one per ground-truth box
    (top-down), rather than the people its model found in whole images (matched by OKS here)."""
    return bool(family.predicts_per_box)


def _sample_image_ids(dataset) -> np.ndarray:
    """The image id of each sample of a family's eval data set (``sample_ids`` of boxes, ``image_ids``)."""
    if hasattr(dataset, "sample_ids"):
        return np.asarray(dataset.sample_ids[0])
    if hasattr(dataset, "image_ids"):
        return np.asarray(dataset.image_ids)
    raise EvalError(f"fowkal show: the eval data set {type(dataset).__name__} names no image per sample")


def _shown(instance) -> bool:
    """A ground-truth instance a family that finds people itself is scored against: not a crowd, with a
    labelled keypoint and an area (the OKS scale)."""
    return not instance.iscrowd and instance.area > 0 and bool((instance.keypoints[:, 2] > 0).any())


def _result_keypoints(result: dict) -> np.ndarray:
    """A COCO-WholeBody result dict's keypoints as ``[133, 3]`` (x, y, score), ``trainer.datasets.keypoints``
    order."""
    return np.concatenate(
        [np.asarray(result[name], dtype=np.float64).reshape(-1, 3) for name, _ in ANNOTATION_KEYPOINT_FIELDS]
    )


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
    """The first ``n`` images (annotation file order) of the family's eval data set with a ground-truth
    instance to show (top-down: a ground-truth box sample)."""
    from trainer.topdown.data import load_wholebody_annotations

    if n < 1:
        raise EvalError(f"--n must be >= 1, got {n}")
    dataset = build_eval_dataset(config, ann_file, image_dir)
    annotations = load_wholebody_annotations(ann_file)
    with_samples = set(_sample_image_ids(dataset).tolist())
    if not _predicts_per_box(family_of(config), dataset):
        with_samples &= {inst.image_id for inst in annotations.instances if _shown(inst)}
    order = list(annotations.images)
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
    """The model's predictions for the ground-truth instances of ``image_ids``, by annotation id: its family's
    inference with its own config (top-down: flip test and DARK on the ground-truth boxes, one pose per
    instance; otherwise the poses found in the images, matched to the instances by OKS)."""
    from torch.utils.data import DataLoader, Subset

    from trainer.topdown.data import load_wholebody_annotations

    config = dataclasses.replace(model.loaded.config, flip_test=flip_test)
    family = family_of(config)
    dataset = build_eval_dataset(config, ann_file, image_dir)
    wanted = set(int(i) for i in image_ids)
    indices = [i for i, image_id in enumerate(_sample_image_ids(dataset).tolist()) if image_id in wanted]
    device = device if device is not None else select_device(None)[0]
    net = model.loaded.model.to(device).eval()
    loader = DataLoader(
        Subset(dataset, indices),
        batch_size=config.data.val_batch_size,
        shuffle=False,
        collate_fn=family.collate_fn(config),
    )
    predictions = family.predict(net, loader, config, device, None, False)
    instances = load_wholebody_annotations(ann_file).instances
    if _predicts_per_box(family, dataset):
        truth = {inst.ann_id: inst for inst in instances}
        sample_anns = dataset.sample_ids[1]
        poses = {}
        for row, index in enumerate(indices):
            # One row at a time: the family's results for the box alone (no OKS-NMS among the boxes).
            box = {key: value[row : row + 1] for key, value in predictions.items()}
            results = family.results(box, config)
            if len(results) != 1:
                raise EvalError(f"the {family.name} family gave {len(results)} results for one box")
            poses[int(sample_anns[index])] = _result_keypoints(results[0])
        return {ann_id: _instance_prediction(truth[ann_id], pose) for ann_id, pose in poses.items()}
    shown = [inst for inst in instances if inst.image_id in wanted and _shown(inst)]
    matched = match_poses(family.results(predictions, config), shown)
    return {inst.ann_id: _instance_prediction(inst, matched.get(inst.ann_id)) for inst in shown}


def match_poses(results: Sequence[dict], instances) -> dict[int, np.ndarray]:
    """Annotation id -> the ``[133, 3]`` pose of ``results`` matched to it: per image, the (pose, instance)
    pair of highest whole-body OKS first, then the best pair of the rest, and so on while the OKS is > 0, so
    that each instance shows the pose closest to it, whatever a stray pose scored."""
    poses_of_image: dict[int, list[np.ndarray]] = {}
    for result in results:
        poses_of_image.setdefault(int(result["image_id"]), []).append(_result_keypoints(result))
    instances_of_image: dict[int, list] = {}
    for inst in instances:
        instances_of_image.setdefault(inst.image_id, []).append(inst)
    matched: dict[int, np.ndarray] = {}
    for image_id, group in instances_of_image.items():
        poses = poses_of_image.get(image_id, [])
        oks = np.zeros((len(poses), len(group)))
        for row, pose in enumerate(poses):
            for column, inst in enumerate(group):
                oks[row, column] = visualize.part_oks(pose, inst.keypoints, inst.area)["wholebody"]
        oks = np.nan_to_num(oks, nan=0.0)
        while oks.size and oks.max() > 0:
            pose, inst = np.unravel_index(np.argmax(oks), oks.shape)
            matched[group[inst].ann_id] = poses[pose]
            oks[pose, :] = 0.0
            oks[:, inst] = 0.0
    return matched


def _instance_prediction(inst, pose: np.ndarray | None) -> InstancePrediction:
    """The ground-truth instance ``inst`` and its ``[133, 3]`` pose (None: no prediction)."""
    if pose is None:
        pose = np.concatenate([np.full((NUM_KEYPOINTS, 2), np.nan), np.zeros((NUM_KEYPOINTS, 1))], axis=1)
    return InstancePrediction(
        ann_id=inst.ann_id,
        image_id=inst.image_id,
        bbox=inst.bbox,
        area=inst.area,
        ground_truth=inst.keypoints,
        keypoints=pose[:, :2],
        scores=pose[:, 2],
    )


def _without_pose(instance: InstancePrediction) -> InstancePrediction:
    """``instance`` with no prediction (nothing drawn, OKS n/a)."""
    return dataclasses.replace(
        instance, keypoints=np.full((NUM_KEYPOINTS, 2), np.nan), scores=np.zeros(NUM_KEYPOINTS)
    )


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
    kpt_thr: float = visualize.DRAW_KEYPOINT_THR,
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
    kpt_thr: float = visualize.DRAW_KEYPOINT_THR,
    top_k: int = 5,
    flip_test: bool = True,
    device: torch.device | None = None,
) -> list[Path]:
    """Write ``show_<image_id>.png`` (one model) or ``compare_<image_id>.png`` (two) for ``n`` images."""
    from trainer.topdown.data import load_wholebody_annotations

    image_ids = select_image_ids(ann_file, image_dir, models[0].loaded.config, n)
    predictions = [predict_instances(m, ann_file, image_dir, image_ids, flip_test, device) for m in models]
    images = load_wholebody_annotations(ann_file).images
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prefix = "show" if len(models) == 1 else "compare"
    files = []
    for image_id in image_ids:
        ann_ids = [a for a, p in predictions[0].items() if p.image_id == image_id]
        # Models of different families may not predict the same instances: a missing one is drawn empty.
        per_model = [[pred.get(a, _without_pose(predictions[0][a])) for a in ann_ids] for pred in predictions]
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
    from trainer.datasets.keypoints import COCO_WHOLEBODY_PARTS, KEYPOINT_NAMES, PART_RANGES
    from trainer.topdown.codec import decode_dark, flip_back_heatmaps

    if part not in HEATMAP_PARTS:
        raise EvalError(f"--heatmaps must be one of {HEATMAP_PARTS}, got {part!r}")
    indices = COCO_WHOLEBODY_PARTS[part] if part in COCO_WHOLEBODY_PARTS else tuple(range(*PART_RANGES[part]))
    config = model.loaded.config
    family = family_of(config)
    if not _has_heatmap_view(family):
        raise EvalError(
            f"--heatmaps: {model.label} is a {family.name} model, which outputs no heatmaps of person crops; "
            "leave out --heatmaps for its skeletons"
        )
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
    kpt_thr: float = visualize.DRAW_KEYPOINT_THR,
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
    "match_poses",
    "predict_instances",
    "render_comparison",
    "render_panel",
    "run_show",
    "select_image_ids",
    "show_heatmaps",
    "show_skeletons",
]
