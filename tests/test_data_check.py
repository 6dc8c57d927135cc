"""``fowkal data check`` on the real mini set: a damaged copy (one file of each problem), the clean copy, an
invalid annotation file and a missing one, through the CLI entry in-process."""

import json
import shutil
from pathlib import Path

import cv2
import pytest
from shared_data import ANN, MINI, needs_mini

from orchestrator.cli import main
from trainer.datasets.annotations import DatasetError, load_wholebody_annotations

pytestmark = needs_mini

TRUNCATED, NOT_AN_IMAGE, MISSING, RESIZED = (
    "000000000785.jpg",
    "000000040083.jpg",
    "000000196141.jpg",
    "000000197388.jpg",
)


def _copy_mini(root: Path) -> tuple[Path, Path]:
    images = root / "images"
    images.mkdir(parents=True)
    for image in json.loads(ANN.read_text())["images"]:
        shutil.copyfile(MINI / image["file_name"], images / image["file_name"])
    ann = root / "ann.json"
    shutil.copyfile(ANN, ann)
    return ann, images


def _check(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["data", "check", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_damaged_copy_each_problem_under_its_heading_clean_copy_exit_0(tmp_path, capsys):
    ann, images = _copy_mini(tmp_path / "damaged")
    (images / TRUNCATED).write_bytes((MINI / TRUNCATED).read_bytes()[:5000])
    (images / NOT_AN_IMAGE).write_text("this is a text file, not a JPEG\n")
    (images / MISSING).unlink()
    original = cv2.imread(str(MINI / RESIZED))
    cv2.imwrite(str(images / RESIZED), cv2.resize(original, (320, 196)))
    out_dir = tmp_path / "report"

    code, out, err = _check(
        capsys, "--ann", str(ann), "--images", str(images), "--workers", "2", "--out", str(out_dir)
    )

    assert code == 1
    assert "checking images" in err  # the progress line goes to stderr, not into the report
    headings = {
        "missing": MISSING,
        "unreadable": NOT_AN_IMAGE,
        "truncated": TRUNCATED,
        "size mismatching the annotation": RESIZED,
    }
    for text in (out, (out_dir / "report.txt").read_text()):
        lines = text.splitlines()
        for heading, file_name in headings.items():
            at = lines.index(f"{heading}: 1")
            assert lines[at + 1].startswith(f"  {file_name} (image_id="), (heading, lines)
        assert "decoded 320x196, the annotation says 640x392" in text
        assert "result: PROBLEMS (4 of 4 images)" in text
    report = json.loads((out_dir / "report.json").read_text())
    assert report["clean"] is False and report["checked"] == 4 and report["annotation_error"] is None
    found = {kind: [entry["file_name"] for entry in entries] for kind, entries in report["problems"].items()}
    assert found == {
        "missing": [MISSING],
        "unreadable": [NOT_AN_IMAGE],
        "truncated": [TRUNCATED],
        "size_mismatch": [RESIZED],
    }
    assert report["problems"]["missing"][0]["image_id"] == 196141

    clean_ann, clean_images = _copy_mini(tmp_path / "clean")
    code, out, _ = _check(
        capsys,
        "--ann",
        str(clean_ann),
        "--images",
        str(clean_images),
        "--out",
        str(tmp_path / "clean_report"),
    )
    assert code == 0, out
    assert "result: clean" in out
    clean = json.loads((tmp_path / "clean_report" / "report.json").read_text())
    assert clean["clean"] is True and clean["checked"] == 4
    assert not any(clean["problems"].values())


def test_invalid_annotation_file_is_a_data_problem_with_the_readers_message(tmp_path, capsys):
    data = json.loads(ANN.read_text())
    data["annotations"][0]["face_kpts"] = data["annotations"][0]["face_kpts"][:-3]
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    with pytest.raises(DatasetError) as reader:
        load_wholebody_annotations(ann, cache_dir=tmp_path / "cache")

    code, out, _ = _check(capsys, "--ann", str(ann), "--images", str(MINI), "--out", str(tmp_path / "report"))

    assert code == 1
    assert str(reader.value) in out
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["annotation_error"] == str(reader.value) and report["checked"] == 0


def test_missing_annotation_file_is_a_usage_error_in_one_line(tmp_path, capsys):
    missing = tmp_path / "nope.json"
    code, out, err = _check(
        capsys, "--ann", str(missing), "--images", str(MINI), "--out", str(tmp_path / "r")
    )
    assert code == 2
    assert err == f"fowkal data check: {missing}: annotation file not found\n"
    assert out == ""
    assert not (tmp_path / "r").exists()  # nothing written for a usage error
