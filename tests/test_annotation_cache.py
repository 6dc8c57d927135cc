"""The per-node annotation cache (trainer/datasets/annotation_cache.py) behind load_wholebody_annotations.

Every test passes a cache directory under tmp_path (and points XDG_CACHE_HOME there), so nothing is written
into the real home cache.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from shared_data import ANN, MINI, needs_mini

import trainer.datasets.annotations as ann_module
from trainer.datasets.annotation_cache import CachedArrays, cached_arrays, default_cache_dir
from trainer.datasets.keypoints import ANNOTATION_KEYPOINT_FIELDS
from trainer.topdown.data import DatasetError, WholeBodyTopDownDataset, load_wholebody_annotations


@pytest.fixture(autouse=True)
def _home_cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def _entries(cache_dir: Path) -> list[Path]:
    return sorted(p for p in cache_dir.iterdir() if p.is_dir()) if cache_dir.exists() else []


def _copy(tmp_path: Path, edit=None, name="ann.json") -> Path:
    content = json.loads(ANN.read_text())
    if edit is not None:
        edit(content)
    path = tmp_path / name
    path.write_text(json.dumps(content))
    return path


class _Counter:
    """Wraps the conversion to count calls."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = ann_module._convert_annotation_file

        def counting(path):
            self.calls += 1
            return real(path)

        monkeypatch.setattr(ann_module, "_convert_annotation_file", counting)


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x" / "fowkal"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "fowkal"


@needs_mini
def test_cached_load_equals_the_strict_parser_and_memory_maps(tmp_path, monkeypatch):
    counter = _Counter(monkeypatch)
    cache = tmp_path / "cache"
    first = load_wholebody_annotations(ANN, cache_dir=cache)
    second = load_wholebody_annotations(ANN, cache_dir=cache)
    assert counter.calls == 1 and len(_entries(cache)) == 1
    strict = ann_module._parse_strict(ANN)
    for name, expected in strict.items():
        for loaded in (first, second):
            got = getattr(loaded, name)
            assert got.dtype == expected.dtype and got.shape == expected.shape, name
            np.testing.assert_array_equal(got, expected, err_msg=name)
    assert isinstance(second.keypoints, np.memmap) and not second.keypoints.flags.writeable
    # The record views match the file.
    raw = {a["id"]: a for a in json.loads(ANN.read_text())["annotations"]}
    for inst in second.instances:
        expected = np.concatenate(
            [
                np.asarray(raw[inst.ann_id][f], dtype=np.float32).reshape(-1, 3)
                for f, _ in ANNOTATION_KEYPOINT_FIELDS
            ]
        )
        np.testing.assert_array_equal(inst.keypoints, expected)
        assert inst.num_keypoints == raw[inst.ann_id]["num_keypoints"]
    assert sorted(second.images) == sorted(i["id"] for i in json.loads(ANN.read_text())["images"])


@needs_mini
def test_fast_parser_defers_unusual_but_valid_input_to_the_strict_one(tmp_path):
    def unusual(content):
        content["images"][0]["id"] = float(content["images"][0]["id"])  # 785.0: an integer, as a float
        del content["annotations"][0]["num_keypoints"]  # counted from the body keypoints instead
        content["annotations"][1]["bbox"] = [int(v) for v in content["annotations"][1]["bbox"]]

    path = _copy(tmp_path, unusual)
    with pytest.raises(ann_module._FastPathRejected):
        ann_module._parse_fast(path)
    loaded = load_wholebody_annotations(path, cache_dir=tmp_path / "cache")
    strict = ann_module._parse_strict(path)
    for name, expected in strict.items():
        np.testing.assert_array_equal(getattr(loaded, name), expected, err_msg=name)
    assert loaded.num_keypoints[0] == 17
    # Without the float id the fast parser takes the file and agrees with the strict one.
    path = _copy(tmp_path, lambda c: c["annotations"][0].pop("num_keypoints"), name="plain.json")
    fast, strict = ann_module._parse_fast(path), ann_module._parse_strict(path)
    for name, expected in strict.items():
        np.testing.assert_array_equal(fast[name], expected, err_msg=name)


@needs_mini
def test_malformed_input_fails_naming_file_id_and_field_before_any_cache_is_written(tmp_path):
    def corrupt(content):
        next(a for a in content["annotations"] if a["id"] == 437295)["lefthand_kpts"][4] = "x"

    path = _copy(tmp_path, corrupt)
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError, match=r"ann\.json.*id=437295.*'lefthand_kpts'"):
        load_wholebody_annotations(path, cache_dir=cache)
    assert _entries(cache) == []
    path = _copy(tmp_path, lambda c: c["annotations"].append(dict(c["annotations"][0])), name="dup.json")
    with pytest.raises(DatasetError, match=r"dup\.json.*id=442619.*duplicate annotation id"):
        load_wholebody_annotations(path, cache_dir=cache)
    assert _entries(cache) == []
    with pytest.raises(DatasetError, match="nope.json.*not found"):
        load_wholebody_annotations(tmp_path / "nope.json", cache_dir=cache)


@needs_mini
def test_a_changed_file_gets_a_new_entry_and_the_old_one_goes(tmp_path, monkeypatch):
    counter = _Counter(monkeypatch)
    cache = tmp_path / "cache"
    path = _copy(tmp_path)
    load_wholebody_annotations(path, cache_dir=cache)
    (old,) = _entries(cache)

    def move(content):
        content["annotations"][0]["bbox"][0] += 5.0

    _copy(tmp_path, move)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    reloaded = load_wholebody_annotations(path, cache_dir=cache)
    assert counter.calls == 2
    (new,) = _entries(cache)
    assert new != old
    original = json.loads(ANN.read_text())["annotations"][0]["bbox"][0]
    assert reloaded.bboxes[0, 0] == pytest.approx(original + 5.0)


@needs_mini
@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "delete_meta", "bad_meta"])
def test_a_corrupt_entry_is_detected_and_rebuilt(tmp_path, monkeypatch, caplog, damage):
    counter = _Counter(monkeypatch)
    cache = tmp_path / "cache"
    expected = ann_module._parse_strict(ANN)
    load_wholebody_annotations(ANN, cache_dir=cache)
    (entry,) = _entries(cache)
    target = entry / "keypoints.npy"
    if damage == "flip_byte":
        blob = bytearray(target.read_bytes())
        blob[-7] ^= 0xFF
        target.write_bytes(bytes(blob))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-100])
    elif damage == "delete_meta":
        (entry / "meta.json").unlink()
    else:
        (entry / "meta.json").write_text("{not json")
    with caplog.at_level(logging.WARNING):
        loaded = load_wholebody_annotations(ANN, cache_dir=cache)
    assert counter.calls == 2
    np.testing.assert_array_equal(loaded.keypoints, expected["keypoints"])
    assert any("corrupt" in r.getMessage() for r in caplog.records)
    # The rebuilt entry is trusted again (no third conversion).
    load_wholebody_annotations(ANN, cache_dir=cache)
    assert counter.calls == 2


def _load_in_child(args):
    """Child process: load through the cache with a slowed, logged conversion (widens the race)."""
    ann, cache, log = args
    real = ann_module._convert_annotation_file

    def slow(path):
        with open(log, "a") as handle:
            handle.write(f"{os.getpid()}\n")
        time.sleep(0.5)
        return real(path)

    ann_module._convert_annotation_file = slow
    loaded = load_wholebody_annotations(ann, cache_dir=cache)
    return np.asarray(loaded.keypoints).sum(dtype=np.float64), str(loaded.arrays.entry)


@needs_mini
def test_concurrent_processes_convert_once_and_share_one_entry(tmp_path):
    cache, log = tmp_path / "cache", tmp_path / "conversions.log"
    log.touch()
    with multiprocessing.get_context("fork").Pool(4) as pool:
        out = pool.map(_load_in_child, [(str(ANN), str(cache), str(log))] * 4)
    assert len(log.read_text().split()) == 1  # one conversion, three waited for it
    assert len({entry for _, entry in out}) == 1 and len(_entries(cache)) == 1
    assert len({total for total, _ in out}) == 1
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name]  # no temporary leftovers


def test_unwritable_cache_dir_converts_in_memory_with_a_warning(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    source = tmp_path / "src.txt"
    source.write_text("3")

    def convert(path):
        return {"value": np.array([int(path.read_text())])}

    with caplog.at_level(logging.WARNING):
        arrays = cached_arrays(source, "test", convert, cache_dir=blocker / "cache")
    assert arrays["value"].tolist() == [3] and arrays.entry is None
    assert any("in memory" in r.getMessage() for r in caplog.records)


def test_cached_arrays_pickle_as_their_path_and_reopen(tmp_path):
    source = tmp_path / "src.bin"
    source.write_bytes(b"x" * 10)
    big = np.arange(1_000_000, dtype=np.float32)
    arrays = cached_arrays(
        source, "test", lambda path: {"big": big, "empty": np.zeros((0, 3))}, tmp_path / "c"
    )
    blob = pickle.dumps(arrays)
    assert len(blob) < 2000
    clone = pickle.loads(blob)
    assert isinstance(clone, CachedArrays) and clone.entry == arrays.entry
    np.testing.assert_array_equal(clone["big"], big)
    assert clone["empty"].shape == (0, 3)


@needs_mini
def test_dataset_pickles_small_and_works_in_forked_and_spawned_loader_workers(tmp_path):
    cache = tmp_path / "cache"
    dataset = WholeBodyTopDownDataset(ANN, MINI, train=False, cache_dir=cache)
    blob = pickle.dumps(dataset)
    assert len(blob) < 50_000  # sample indices and paths, not the annotation arrays
    expected = [dataset[i]["keypoints"] for i in range(len(dataset))]
    clone = pickle.loads(blob)
    for i in range(len(dataset)):
        torch.testing.assert_close(clone[i]["keypoints"], expected[i], rtol=0, atol=0)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=4, num_workers=2, multiprocessing_context="fork", shuffle=False
    )
    got = torch.cat([batch["keypoints"] for batch in loader])
    torch.testing.assert_close(got, torch.stack(expected), rtol=0, atol=0)


@needs_mini
def test_image_check_lists_each_directory_once(tmp_path, monkeypatch):
    root = tmp_path / "images"
    root.mkdir()
    for image in json.loads(ANN.read_text())["images"]:
        (root / image["file_name"]).symlink_to(MINI / image["file_name"])
    (root / "000000197388.jpg").unlink()
    (root / "000000197388.jpg").symlink_to(tmp_path / "dangling.jpg")  # a dangling link is missing
    calls = []
    real_scandir = os.scandir
    monkeypatch.setattr(ann_module.os, "scandir", lambda path: calls.append(path) or real_scandir(path))
    monkeypatch.setattr(ann_module.os.path, "isfile", lambda path: pytest.fail(f"stat of {path}"))
    with pytest.raises(DatasetError, match=r"1 image file\(s\) missing.*000000197388\.jpg"):
        WholeBodyTopDownDataset(ANN, root, cache_dir=tmp_path / "cache")
    assert [str(path) for path in calls if "images" in str(path)] == [str(root)]  # the cache lists its own
