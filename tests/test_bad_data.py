"""Bad data never costs a run (issue #22, items 1 and 2), on damaged copies of the data built in tmp_path.

- GT boxes as MMPose treats them: clipped to the image, an instance whose clipped box is empty dropped by
  both families' data sets, counted, named once; a non-finite box value an error naming the file,
  annotation id and field (trainer/datasets/annotations.py, the annotation cache).
- Unreadable training images (a JPEG truncated to 5000 bytes, a text file named .jpg) skipped: the next
  sample takes the place, the same for the same seed, recorded per sample, counted per epoch by the loop
  (``data/bad_images``), listed in ``bad_images.txt`` (logged to MLflow by orchestrator/runs/outputs.py),
  and the run fails past ``data.max_bad_images`` (trainer/datasets/bad_images.py). Evaluation still fails.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from shared_data import ANN, MINI, needs_mini

import trainer.datasets.annotations as annotations_module
from trainer.config import ConfigError, config_digest, config_from_dict, config_to_dict
from trainer.datasets.annotations import DatasetError, load_wholebody_annotations
from trainer.datasets.bad_images import (
    BAD_IMAGES_FILE,
    SAMPLE_KEY,
    CollateBadImages,
    TooManyBadImagesError,
)
from trainer.datasets.common import ImageFileError, read_bgr_image
from trainer.datasets.synth import write_synthetic_dataset
from trainer.kapao.dataset import KapaoDataset, KapaoPipelineConfig, collate_kapao
from trainer.loop import train_loop_per_worker
from trainer.topdown.data import WholeBodyTopDownDataset

SMALL_KAPAO = KapaoPipelineConfig(input_size=256)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _mini_copy(tmp_path: Path, edit=None) -> tuple[Path, Path]:
    """An annotation copy (``edit``ed) and a copy of the mini images in tmp_path."""
    data = json.loads(ANN.read_text())
    if edit is not None:
        edit(data)
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    root = tmp_path / "images"
    root.mkdir()
    for image in data["images"]:
        shutil.copyfile(MINI / image["file_name"], root / image["file_name"])
    return ann, root


def _set_box(data: dict, ann_id: int, box) -> None:
    next(a for a in data["annotations"] if a["id"] == ann_id)["bbox"] = box


def _damage_images(root: Path, truncated: str, not_an_image: str) -> None:
    """A JPEG cut to its first 5000 bytes (OpenCV would decode it, grey below) and a text file named .jpg."""
    path = root / truncated
    path.write_bytes(path.read_bytes()[:5000])
    (root / not_an_image).write_text("this is not an image\n")


# ---------------------------------------------------------------------------------------------- GT boxes


@needs_mini
def test_empty_boxes_are_dropped_and_outside_boxes_clipped_as_mmpose_in_both_families(tmp_path, capfd):
    def damage(data):
        _set_box(data, 198196, [10, 10, -5, 20])  # negative width (image 40083, 500 x 333)
        _set_box(data, 230195, [600, 10, 50, 50])  # wholly right of image 40083: empty once clipped
        _set_box(data, 460541, [-20, -10, 700, 300])  # reaches outside image 196141 (640 x 429)

    ann, root = _mini_copy(tmp_path, damage)
    cache = tmp_path / "cache"
    loaded = load_wholebody_annotations(ann, cache_dir=cache)
    again = load_wholebody_annotations(ann, cache_dir=cache)  # a second data set of the same file
    ids = np.asarray(loaded.ann_ids).tolist()
    assert loaded.num_dropped_instances == 2
    assert sorted(np.asarray(loaded.ann_ids)[~np.asarray(loaded.box_kept)].tolist()) == [198196, 230195]
    # MMPose's parse_data_info: x1, y1, x2, y2 clipped to [0, W - 1] x [0, H - 1].
    np.testing.assert_array_equal(loaded.clipped_boxes[ids.index(460541)], [0, 0, 639, 290])
    np.testing.assert_array_equal(loaded.clipped_boxes[ids.index(198196)], [10, 10, 5, 30])  # x2 < x1
    # Printed once per process and file: one line naming the file, the count and the ids.
    lines = [line for line in capfd.readouterr().err.splitlines() if "dropped" in line]
    assert len(lines) == 1 and str(ann) in lines[0] and "2 instance(s)" in lines[0] and "198196" in lines[0]
    # Cached (memory-mapped), in memory (the strict parser) and the second read agree.
    strict = annotations_module._parse_strict(ann)
    for name in ("clipped_boxes", "box_kept"):
        np.testing.assert_array_equal(getattr(again, name), strict[name], err_msg=name)
        assert isinstance(getattr(again, name), np.memmap)

    # Top-down: the GT-box samples (train and eval, fowkal eval's too) leave the two out, the clipped box in.
    topdown = WholeBodyTopDownDataset(ann, root, train=False, cache_dir=cache)
    image_ids, ann_ids = topdown.sample_ids
    assert len(topdown) == 10 and not {198196, 230195} & set(ann_ids.tolist())
    np.testing.assert_array_equal(topdown._boxes[ann_ids.tolist().index(460541)], [0, 0, 639, 290])
    # KAPAO: no pose object, and no keypoint object, of a dropped instance.
    kapao = KapaoDataset(ann, root, SMALL_KAPAO, train=False, cache_dir=cache)
    sample = kapao[kapao.image_ids.tolist().index(40083)]
    assert sample["ann_ids"].tolist() == [1202706]  # the image's third person, the only one left
    kept = load_wholebody_annotations(ann, cache_dir=cache).keypoints[ids.index(1202706)]
    assert len(sample["kp_classes"]) == int((kept[:, 2] > 0).sum())  # its keypoint objects only


@needs_mini
def test_a_non_finite_box_is_an_error_naming_file_annotation_and_field(tmp_path):
    ann, _ = _mini_copy(tmp_path, lambda data: _set_box(data, 198196, [38.08, 110.95, float("nan"), 5.0]))
    with pytest.raises(
        DatasetError, match=r"ann\.json: annotation id=198196: field 'bbox' .*nan at position 2"
    ):
        load_wholebody_annotations(ann, cache_dir=tmp_path / "cache")
    assert not any((tmp_path / "cache").glob("ann.wholebody.*/meta.json"))  # nothing cached


# ---------------------------------------------------------------------------------------------- images


@needs_mini
def test_training_skips_bad_images_deterministically_and_evaluation_names_them(tmp_path):
    ann, root = _mini_copy(tmp_path)
    _damage_images(root, truncated="000000040083.jpg", not_an_image="000000000785.jpg")
    with pytest.raises(ImageFileError, match="truncated") as truncated:
        read_bgr_image(str(root / "000000040083.jpg"), "image_id=40083")
    assert truncated.value.path == str(root / "000000040083.jpg")
    problems = {"000000040083.jpg": truncated.value.problem, "000000000785.jpg": "unreadable"}
    cache = tmp_path / "cache"

    # Top-down: sample 0 (image 785) and samples 1-2 (image 40083) are bad: sample 3 takes their place.
    def topdown_sample(index: int, seed: int = 0) -> dict:
        torch.manual_seed(seed)
        return WholeBodyTopDownDataset(ann, root, cache_dir=cache)[index]

    replaced, same_seed, replacement = topdown_sample(0), topdown_sample(0), topdown_sample(3)
    assert replaced["ann_id"] == replacement["ann_id"] == 460541
    assert torch.equal(replaced["image"], same_seed["image"]) and torch.equal(
        replaced["image"], replacement["image"]
    )
    met = dict(json.loads(replaced[SAMPLE_KEY]))
    assert {Path(p).name for p in met} == set(problems)
    assert all(problems[Path(p).name].split(" ")[0] in problem for p, problem in met.items())
    assert replacement[SAMPLE_KEY] == ""
    # The records leave the samples for the batch (what comes back from a loader process).
    batch = CollateBadImages(None)([replaced, replacement])
    assert batch["image"].shape[0] == 2 and [Path(p).name for p, _ in batch[SAMPLE_KEY]] == sorted(problems)

    # KAPAO: the mosaic's own tile (image 785, then 40083) is replaced by image 196141, with the same draws.
    def kapao_sample(index: int) -> dict:
        torch.manual_seed(5)
        return KapaoDataset(ann, root, SMALL_KAPAO, train=True, cache_dir=cache)[index]

    replaced, replacement = kapao_sample(0), kapao_sample(2)
    assert replaced["image_id"] == replacement["image_id"] == 196141
    assert torch.equal(replaced["image"], replacement["image"])
    assert {Path(p).name for p, _ in json.loads(replaced[SAMPLE_KEY])} >= {"000000000785.jpg"}
    batch = CollateBadImages(collate_kapao)([replaced, replacement])
    assert batch["images"].shape[0] == 2 and SAMPLE_KEY in batch

    # Evaluation: an error naming the file, truncated or not an image (no silent partial score).
    evaluation = WholeBodyTopDownDataset(ann, root, train=False, cache_dir=cache)
    with pytest.raises(DatasetError, match=r"000000040083\.jpg: image file truncated.*ann_id=198196"):
        evaluation[1]
    kapao_eval = KapaoDataset(ann, root, SMALL_KAPAO, train=False, cache_dir=cache)
    with pytest.raises(DatasetError, match=r"000000000785\.jpg: image file unreadable"):
        kapao_eval[kapao_eval.image_ids.tolist().index(785)]


# ---------------------------------------------------------------------------------------------- config


def test_max_bad_images_is_a_count_that_leaves_the_digest_alone():
    default = config_from_dict({})
    assert default.data.max_bad_images == 100
    before = config_to_dict(default)
    del before["data"]["max_bad_images"]  # a config written before the key
    assert config_digest(before) == config_digest(default)
    assert config_digest(config_from_dict({"data": {"max_bad_images": 0}})) == config_digest(default)
    for value in (-1, "many", 2.5, True):
        with pytest.raises(ConfigError, match="data.max_bad_images"):
            config_from_dict({"data": {"max_bad_images": value}})


# ---------------------------------------------------------------------------------------------- training


def _damaged_synthetic_sets(tmp_path: Path) -> tuple[dict, dict[str, str]]:
    """A synthetic training set whose images 1 and 3 are bad and whose annotation 0 has a negative-width box,
    and a clean synthetic val set: the ``data:`` paths, and the bad files' names -> their problem's word."""
    train_dir, val_dir = tmp_path / "train", tmp_path / "val"
    train_ann = Path(write_synthetic_dataset(train_dir, num_images=6, seed=0))
    content = json.loads(train_ann.read_text())
    content["annotations"][0]["bbox"][2] = -5.0
    train_ann.write_text(json.dumps(content))
    names = [image["file_name"] for image in content["images"]]
    _damage_images(train_dir / "images", truncated=names[1], not_an_image=names[3])
    val_ann = write_synthetic_dataset(val_dir, num_images=2, seed=1)
    paths = {
        "train_ann_file": str(train_ann),
        "train_image_root": str(train_dir / "images"),
        "val_ann_file": str(val_ann),
        "val_image_root": str(val_dir / "images"),
    }
    return paths, {names[1]: "truncated", names[3]: "unreadable"}


def _training_config(output_dir: Path, paths: dict, **data) -> dict:
    """The plain loop's tiny top-down recipe (tests/test_loop.py), one epoch of one batch of every sample."""
    samples = len(WholeBodyTopDownDataset(paths["train_ann_file"], paths["train_image_root"]))
    return {
        "output_dir": str(output_dir),
        "epochs": 1,
        "batch_size": samples,  # one batch: every sample is drawn (drop_last drops none)
        "data": {
            **paths,
            "loader_workers": 1,  # the records come back from another process
            "val_batch_size": 8,
            "pipeline": {"input_size": [64, 64], "heatmap_size": [16, 16]},
            **data,
        },
        "model": {"backbone": "hrnet_w18_small"},
        "loss": {"variant": "mse"},
        "optim": {"lr": 1e-3, "warmup_iters": 1},
    }


class _Recorder:
    """The MLflow client calls log_run_outputs makes, recorded."""

    def __init__(self):
        self.artifacts: list[str] = []

    def log_artifact(self, run_id, path, artifact_path=None):
        self.artifacts.append(Path(path).name)

    def log_artifacts(self, run_id, path, artifact_path=None):
        self.artifacts.append(artifact_path)

    def log_inputs(self, run_id, datasets=None, models=None):
        pass


class _Checkpoint:
    def __init__(self, path: Path):
        self.path = str(path)

    @contextlib.contextmanager
    def as_directory(self):
        yield self.path


def test_training_skips_counts_and_lists_bad_images_and_fails_past_the_limit(tmp_path):
    paths, bad = _damaged_synthetic_sets(tmp_path)
    values = _training_config(tmp_path / "run", paths)
    last = train_loop_per_worker(values)
    out = Path(values["output_dir"])
    assert last["data/bad_images"] == 2 and last["data/dropped_instances"] == 1
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["data/bad_images"] == 2
    listed = dict(line.split("\t") for line in (out / BAD_IMAGES_FILE).read_text().splitlines())
    assert {Path(p).name: problem.split(" ")[0] for p, problem in listed.items()} == bad
    checkpoint = torch.load(out / "checkpoints" / "latest.pt", weights_only=False)
    assert dict(checkpoint["bad_images"]) == listed  # a resumed run keeps counting the run's files

    # The orchestrator logs the list from the run's last checkpoint directory as an MLflow artifact.
    from orchestrator.runs.outputs import log_run_outputs

    client = _Recorder()
    result = type("Result", (), {"best_checkpoints": [], "checkpoint": _Checkpoint(out)})()
    outputs = log_run_outputs(client, "run", config_from_dict(values), result, print_fn=lambda line: None)
    assert BAD_IMAGES_FILE in client.artifacts and BAD_IMAGES_FILE in outputs.artifacts

    # data.max_bad_images: 0 fails at the first batch that met one, naming the count, the limit, the files.
    strict = _training_config(tmp_path / "strict", paths, max_bad_images=0)
    with pytest.raises(TooManyBadImagesError, match=r"met 2 bad image file\(s\).*data\.max_bad_images=0: "):
        train_loop_per_worker(strict)
    assert (Path(strict["output_dir"]) / BAD_IMAGES_FILE).read_text() == (out / BAD_IMAGES_FILE).read_text()
