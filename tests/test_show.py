"""`fowkal show` and trainer/evaluation/visualize.py: OKS by hand, moved-keypoint marks, PNG sizes, MLflow
artifacts."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from shared_data import ANN, MINI, needs_mini

from orchestrator.cli import main
from trainer.config import config_from_dict, config_to_dict
from trainer.datasets.keypoints import ANNOTATION_KEYPOINT_FIELDS, NUM_KEYPOINTS
from trainer.evaluation import visualize

TINY_CONFIG = {
    "name": "tiny",
    "model": {"backbone": "hrnet_w18_small"},
    "loss": {"variant": "mse"},
    "data": {"pipeline": {"input_size": [32, 32], "heatmap_size": [8, 8]}, "loader_workers": 0},
}


def _save_checkpoint(path: Path, seed: int) -> Path:
    from trainer.topdown.model import build_pose_model

    torch.manual_seed(seed)
    model = build_pose_model("hrnet_w18_small", NUM_KEYPOINTS, with_kaf=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "config": config_to_dict(config_from_dict(TINY_CONFIG))}, path)
    return path


# ------------------------------------------------------------------------------------------ pure helpers


def test_part_oks_by_hand():
    sigmas = [0.1, 0.05, 0.2, 0.1]
    truth = np.array([[10, 10, 2], [20, 20, 1], [30, 30, 0], [40, 40, 2]], dtype=float)
    predicted = np.array([[13, 14], [20, 20], [99, 99], [40, 46]], dtype=float)
    area = 100.0
    parts = {"a": (0, 1), "b": (2,), "c": (2, 3)}
    oks = visualize.part_oks(predicted, truth, area, parts=parts, sigmas=sigmas)
    # COCO: exp(-d^2 / (2 * area * (2 sigma)^2)); keypoint 2 is unlabelled.
    k0 = math.exp(-25 / (2 * 100 * 0.2**2))  # d = (3, 4)
    k1 = 1.0
    k3 = math.exp(-36 / (2 * 100 * 0.2**2))
    assert oks["a"] == pytest.approx((k0 + k1) / 2)
    assert math.isnan(oks["b"])
    assert oks["c"] == pytest.approx(k3)
    assert visualize.format_oks(oks) == f"a {(k0 + k1) / 2:.2f} b n/a c {k3:.2f}"


def test_moved_keypoints_ranks_by_distance_among_candidates():
    first = np.zeros((6, 2))
    second = np.zeros((6, 2))
    second[1] = (3, 4)  # 5 px
    second[2] = (0, 10)  # 10 px, not a candidate
    second[4] = (1, 0)  # 1 px, below min_distance
    second[5] = (6, 8)  # 10 px
    candidates = np.array([True, True, False, True, True, True])
    moved = visualize.moved_keypoints(first, second, candidates=candidates, top_k=3, min_distance=2.0)
    assert moved.tolist() == [5, 1]


def test_draw_wholebody_draws_only_confident_keypoints_in_part_colours():
    image = np.zeros((100, 100, 3), dtype=np.uint8)
    keypoints = np.full((NUM_KEYPOINTS, 2), 50.0)
    keypoints[11] = (20, 80)  # left hip
    keypoints[13] = (80, 80)  # left knee: the body link (13, 11) is a horizontal line at y = 80
    scores = np.zeros(NUM_KEYPOINTS)
    assert (visualize.draw_wholebody(image, keypoints, scores, score_thr=0.5) == 0).all()
    scores[[11, 13]] = 0.9
    drawn = visualize.draw_wholebody(image, keypoints, scores, score_thr=0.5)
    assert drawn.shape == image.shape and (image == 0).all()  # a copy
    assert tuple(drawn[80, 50]) == visualize.PART_COLOURS["body"]
    assert (drawn[:70] == 0).all()  # nothing else


def _instance(ground_truth, keypoints, scores=None):
    from orchestrator.evaluation.show import InstancePrediction

    return InstancePrediction(
        ann_id=1,
        image_id=1,
        bbox=(10.0, 10.0, 100.0, 100.0),
        area=5000.0,
        ground_truth=ground_truth,
        keypoints=keypoints,
        scores=np.zeros(NUM_KEYPOINTS) if scores is None else scores,
    )


def _colour_mask(image, colour):
    return (image == np.asarray(colour, dtype=np.uint8)).all(axis=-1)


def test_comparison_marks_the_keypoint_that_moved_in_the_better_or_worse_colour():
    from orchestrator.evaluation.show import render_comparison

    image = np.full((200, 160, 3), 128, dtype=np.uint8)
    truth = np.zeros((NUM_KEYPOINTS, 3))
    truth[:, :2] = (80, 100)
    truth[:5, 2] = 2  # 5 labelled keypoints
    first = truth[:, :2].copy()
    first[3] = (40, 40)  # the first run is 72 px off on keypoint 3
    second = truth[:, :2].copy()  # the second run is exact: better
    picture = render_comparison(
        image, [[_instance(truth, first)], [_instance(truth, second)]], ["a", "b"], kpt_thr=2.0
    )
    lines = 1 + 1  # label + one instance
    legend = visualize.caption_band_height(2)  # what the green and red circles mean
    assert picture.shape == (
        200 + visualize.LINE_HEIGHT * lines + visualize.LINE_HEIGHT // 3 + legend,
        2 * 160 + visualize.PANEL_GAP,
        3,
    )
    legend_band = picture[-legend:]
    assert _colour_mask(legend_band, visualize.BETTER_COLOUR).any()
    assert _colour_mask(legend_band, visualize.WORSE_COLOUR).any()
    left, right = picture[:200, :160], picture[:200, 160 + visualize.PANEL_GAP :]
    better = _colour_mask(left, visualize.BETTER_COLOUR)
    ys, xs = np.nonzero(better)
    assert better.any() and not _colour_mask(left, visualize.WORSE_COLOUR).any()
    # Left: a circle around the first run's keypoint 3 at (40, 40) only.
    assert np.abs(xs - 40).max() <= 11 and np.abs(ys - 40).max() <= 11
    # Right: an arrow from (40, 40) to the second run's (80, 100), circled there.
    right_better = _colour_mask(right, visualize.BETTER_COLOUR)
    assert right_better[95:106, 70:91].any() and right_better[55:85, 45:75].any()

    worse = render_comparison(
        image, [[_instance(truth, second)], [_instance(truth, first)]], ["a", "b"], kpt_thr=2.0
    )
    assert _colour_mask(worse[:200], visualize.WORSE_COLOUR).any()
    assert not _colour_mask(worse[:200], visualize.BETTER_COLOUR).any()


# ------------------------------------------------------------------------------------------ the command


def _expected_instances() -> dict[int, int]:
    """Image id -> number of instances drawn: non-crowd annotations with a labelled keypoint."""
    data = json.loads(ANN.read_text())
    counts = {image["id"]: 0 for image in data["images"]}
    for ann in data["annotations"]:
        labelled = any(v > 0 for f, _ in ANNOTATION_KEYPOINT_FIELDS for v in ann[f][2::3])
        if not ann["iscrowd"] and labelled and ann["area"] > 0:
            counts[ann["image_id"]] += 1
    return counts


def _image_sizes() -> dict[int, tuple[int, int]]:
    return {im["id"]: (im["height"], im["width"]) for im in json.loads(ANN.read_text())["images"]}


@needs_mini
def test_show_one_checkpoint_writes_images_of_the_expected_size(tmp_path, capsys):
    checkpoint = _save_checkpoint(tmp_path / "a.pt", seed=0)
    out = tmp_path / "out"
    args = ["show", "--checkpoint", str(checkpoint), "--ann", str(ANN), "--images", str(MINI)]
    assert main(args + ["--out", str(out), "--n", "3"]) == 0
    counts, sizes = _expected_instances(), _image_sizes()
    first_three = [i for i in sizes if counts[i] > 0][:3]
    assert sorted(p.name for p in out.iterdir()) == sorted(f"show_{i}.png" for i in first_three)
    for image_id in first_three:
        picture = cv2.imread(str(out / f"show_{image_id}.png"))
        height, width = sizes[image_id]
        band = visualize.LINE_HEIGHT * (1 + counts[image_id]) + visualize.LINE_HEIGHT // 3
        assert picture.shape == (height + band, width, 3)
    assert "wrote" in capsys.readouterr().out


@needs_mini
def test_show_two_runs_side_by_side_and_logged(tmp_path, capsys):
    from orchestrator import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.make_client(uri)
    experiment = tracking.get_or_create_experiment(client, "show-test")
    run_ids = []
    for seed in (0, 1):
        run_id = tracking.start_run(client, experiment, f"tiny-{seed}")
        directory = tmp_path / f"ckpt{seed}"
        _save_checkpoint(directory / "checkpoint.pt", seed=seed)
        tracking.log_artifact_path(run_id, directory, client=client, artifact_path="best_checkpoint")
        run_ids.append(run_id)
    out = tmp_path / "out"
    args = ["show", "--run", run_ids[0], "--run", run_ids[1], "--tracking-uri", uri, "--ann", str(ANN)]
    assert main(args + ["--images", str(MINI), "--out", str(out), "--n", "2", "--log"]) == 0
    counts, sizes = _expected_instances(), _image_sizes()
    first_two = [i for i in sizes if counts[i] > 0][:2]
    names = sorted(f"compare_{i}.png" for i in first_two)
    assert sorted(p.name for p in out.iterdir()) == names
    for image_id in first_two:
        picture = cv2.imread(str(out / f"compare_{image_id}.png"))
        height, width = sizes[image_id]
        band = visualize.LINE_HEIGHT * (1 + counts[image_id]) + visualize.LINE_HEIGHT // 3
        legend = visualize.caption_band_height(2)
        assert picture.shape == (height + band + legend, 2 * width + visualize.PANEL_GAP, 3)
    for run_id in run_ids:
        logged = sorted(a.path for a in client.list_artifacts(run_id, "show"))
        assert logged == [f"show/{name}" for name in names]


@needs_mini
def test_heatmap_view_size(tmp_path):
    checkpoint = _save_checkpoint(tmp_path / "a.pt", seed=0)
    ann_id = json.loads(ANN.read_text())["annotations"][0]["id"]
    out = tmp_path / "heat"
    args = [
        "show",
        "--checkpoint",
        str(checkpoint),
        "--ann",
        str(ANN),
        "--images",
        str(MINI),
        "--out",
        str(out),
    ]
    assert main(args + ["--heatmaps", "foot", "--instance", str(ann_id)]) == 0
    (png,) = list(out.iterdir())
    assert png.name.endswith(f"_ann{ann_id}_foot.png")
    # 32 px crops enlarged x5 (the smallest factor reaching 160 px); crop + max + 6 foot keypoints = 8 tiles,
    # one row of HEATMAP_COLUMNS = 8.
    assert cv2.imread(str(png)).shape == (160 + visualize.LINE_HEIGHT, 8 * 160, 3)  # a title band per row


@needs_mini
def test_show_errors_name_the_problem(tmp_path, capsys):
    checkpoint = _save_checkpoint(tmp_path / "a.pt", seed=0)
    base = ["show", "--checkpoint", str(checkpoint), "--ann", str(ANN), "--out", str(tmp_path / "o")]
    assert main(base + ["--images", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "missing") in err and "--images" in err
    assert main(base + ["--images", str(MINI), "--log"]) == 2
    assert "--run" in capsys.readouterr().err
    assert main(base + ["--images", str(MINI), "--heatmaps", "foot", "--instance", "424242"]) == 2
    assert "424242" in capsys.readouterr().err
    assert main(base + ["--images", str(MINI), "--heatmaps", "tail"]) == 2
    assert "'tail'" in capsys.readouterr().err


def test_heatmap_tile_titles_fit_their_tiles():
    tiles = [np.full((40, 60, 3), 90, dtype=np.uint8) for _ in range(3)]
    labels = ["left_hand_thumb_tip_long_name 0.512", "nose 0.9", "x"]
    grid = visualize.tile_grid(tiles, labels, columns=3)
    assert grid.shape == (40 + visualize.LINE_HEIGHT, 180, 3)
    title_row = grid[: visualize.LINE_HEIGHT]
    for column in range(3):  # each title's ink stays inside its own tile's columns
        ink = np.nonzero((title_row[:, column * 60 : (column + 1) * 60] < 128).any(axis=(0, 2)))[0]
        assert ink.size and ink.max() < 60 - 2
    text, scale = visualize.fit_text(labels[0], 54)
    assert text.endswith("...") or scale < visualize.FONT_SCALE
    assert (grid[visualize.LINE_HEIGHT :, :60] == 90).all()  # tiles are not drawn over


class _ImageLevelFamily:
    """A family that finds people in whole images itself (as KAPAO does): its poses of an image are the
    image's ground truth moved 3 px right (unlabelled people too), the smallest first, and a stray pose."""

    name = "image_level_test"
    predicts_per_box = False
    heatmap_eval_sweep = False

    def eval_dataset(self, cfg, ann_file, image_dir, det_file=None):
        from trainer.topdown.data import load_wholebody_annotations

        class Images(torch.utils.data.Dataset):
            image_ids = np.asarray(list(load_wholebody_annotations(ann_file).images))

            def __len__(self):
                return len(self.image_ids)

            def __getitem__(self, index):
                return {"image_id": int(self.image_ids[index])}

        return Images()

    def collate_fn(self, cfg):
        return None

    def predict(self, model, loader, cfg, device, amp_dtype, channels_last):
        from trainer.topdown.data import load_wholebody_annotations

        wanted = [i for batch in loader for i in batch["image_id"].tolist()]
        ids, poses, scores = [], [], []
        for inst in load_wholebody_annotations(str(ANN)).instances:
            if inst.image_id in wanted and not inst.iscrowd:
                pose = inst.keypoints.astype(np.float64).copy()
                pose[:, 0] += 3.0
                pose[:, 2] = np.where(inst.keypoints[:, 2] > 0, 0.9, 0.0)
                ids.append(inst.image_id)
                poses.append(pose)
                scores.append(1.0 / (1.0 + inst.area))  # the smallest person first
        stray = np.zeros((NUM_KEYPOINTS, 3))
        stray[:, :2] = 1e4
        ids, poses, scores = ids + [wanted[0]], poses + [stray], scores + [0.0]
        return {"image_ids": np.asarray(ids), "keypoints": np.asarray(poses), "scores": np.asarray(scores)}

    def results(self, predictions, cfg):
        from trainer.evaluation.wholebody import keypoints_to_results

        return keypoints_to_results(predictions["image_ids"], predictions["keypoints"], predictions["scores"])


@needs_mini
def test_show_asks_the_family_and_matches_whole_image_poses_to_instances(tmp_path, monkeypatch):
    """A family without person boxes: its poses are matched to the instances by OKS; two families side by
    side; no heatmap view for a family without heatmaps."""
    import trainer.evaluation.model_eval
    from orchestrator.evaluation import show
    from trainer.families import family_of

    image_level = _ImageLevelFamily()

    def family_for(cfg):
        return image_level if cfg.name == "image-level" else family_of(cfg)

    monkeypatch.setattr(show, "family_of", family_for)
    monkeypatch.setattr(trainer.evaluation.model_eval, "family_of", family_for)
    config = config_from_dict({**TINY_CONFIG, "name": "image-level"})
    model = show.ShowModel(SimpleNamespace(config=config, model=torch.nn.Identity()), label="image level")

    image_ids = show.select_image_ids(ANN, MINI, config, 3)
    counts = _expected_instances()
    assert image_ids == [i for i in _image_sizes() if counts[i] > 0][:3]
    predicted = show.predict_instances(model, ANN, MINI, image_ids, device=torch.device("cpu"))
    assert sorted({p.image_id for p in predicted.values()}) == sorted(image_ids)
    assert len(predicted) == sum(counts[i] for i in image_ids)
    for inst in predicted.values():  # each instance got its own pose back, not a neighbour's or the stray
        labelled = inst.ground_truth[:, 2] > 0
        assert np.allclose(inst.keypoints[labelled], inst.ground_truth[labelled, :2] + [3.0, 0.0])
        assert np.all(inst.scores[labelled] == 0.9)

    top_down = show.ShowModel(show.load_checkpoint_model(_save_checkpoint(tmp_path / "a.pt", 0)), label="td")
    files = show.show_skeletons([top_down, model], ANN, MINI, tmp_path / "out", n=2)
    assert [p.name for p in files] == [f"compare_{i}.png" for i in image_ids[:2]]
    with pytest.raises(show.EvalError, match="image_level_test"):
        show.show_heatmaps(model, ANN, MINI, tmp_path / "heat", "foot")
