"""``fowkal data check --ann FILE --images DIR [--workers N] [--out DIR]``: is a data set fit to train or
evaluate on, before a run finds out?

The annotation file is read by the reader every command uses (``load_wholebody_annotations``: the same
errors, the same per-node cache); then every image it names is checked by
``trainer.datasets.image_check.check_image`` (missing, unreadable, truncated, of another size than the
annotation's width x height) in worker processes, with a progress line on stderr. The report is printed and
written as ``report.txt`` and ``report.json`` under ``--out``; it also names the annotations every data set
drops (box empty once clipped to its image, as MMPose does), which are not a problem. Exit status: 0 clean,
1 the data has problems (an invalid annotation file or any image problem), 2 a usage error (no such
annotation file or image directory, a bad ``--workers``). No Ray, no MLflow.
"""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trainer.datasets.image_check import (
    MISSING,
    PROBLEM_KINDS,
    SIZE_MISMATCH,
    TRUNCATED,
    UNREADABLE,
    ImageCheck,
    check_image,
)

DEFAULT_OUT_DIR = "data_check"
REPORT_TEXT = "report.txt"
REPORT_JSON = "report.json"
# Images per task sent to a worker process: large enough that the pickling round trip is noise beside
# ~5 ms of decode per image, small enough that the progress line moves and the last tasks balance.
CHUNK_IMAGES = 32
# Tasks queued ahead of the workers (per worker), so a 118k-image file is not pickled into the queue at once.
TASKS_AHEAD_PER_WORKER = 4
# Entries per heading on the console; report.txt and report.json hold them all.
CONSOLE_ENTRIES = 20
HEADINGS = {
    MISSING: "missing",
    UNREADABLE: "unreadable",
    TRUNCATED: "truncated",
    SIZE_MISMATCH: "size mismatching the annotation",
}


class DataCheckUsageError(ValueError):
    """A usage error (exit 2): no such annotation file or image directory, a bad --workers or --out."""


@dataclass
class DataCheckReport:
    """What ``fowkal data check`` found; ``problems``: per kind (``PROBLEM_KINDS``), the images with that
    problem in annotation-file order, each ``{"image_id", "file_name", "detail"}``."""

    ann_file: str
    image_dir: str
    workers: int
    annotation_error: str | None = None
    images: int = 0
    annotations: int = 0
    # Annotations every data set drops (box empty once clipped to its image, as MMPose): told, not a problem.
    dropped_ann_ids: list[int] = field(default_factory=list)
    checked: int = 0
    seconds: float = 0.0
    problems: dict[str, list[dict]] = field(default_factory=lambda: {kind: [] for kind in PROBLEM_KINDS})

    @property
    def clean(self) -> bool:
        return self.annotation_error is None and not any(self.problems.values())

    @property
    def problem_images(self) -> int:
        return len({entry["image_id"] for entries in self.problems.values() for entry in entries})

    def to_json(self) -> dict:
        return {
            "annotation_file": self.ann_file,
            "image_dir": self.image_dir,
            "clean": self.clean,
            "annotation_error": self.annotation_error,
            "images": self.images,
            "annotations": self.annotations,
            "dropped_instances": {"count": len(self.dropped_ann_ids), "ann_ids": self.dropped_ann_ids},
            "checked": self.checked,
            "problem_images": self.problem_images,
            "workers": self.workers,
            "seconds": round(self.seconds, 3),
            "problems": self.problems,
        }


def default_workers() -> int:
    """The machine's CPU count."""
    return os.cpu_count() or 1


def _silence_stderr() -> None:
    """Worker initializer: libjpeg prints "Premature end of JPEG file" and OpenCV its warnings straight to
    file descriptor 2, once per bad file, through the progress line; what they say is in the report."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)


def _check_rows(image_dir: str, rows: list[tuple[str, int, int, int]]) -> list[ImageCheck]:
    """A worker's task: the images of ``rows`` (file name, image id, width, height) that have problems."""
    found = []
    for file_name, image_id, width, height in rows:
        result = check_image(image_dir, file_name, image_id, width, height)
        if not result.ok:
            found.append(result)
    return found


def check_image_files(
    image_dir: str, rows: list[tuple[str, int, int, int]], workers: int, progress: bool = True
) -> list[ImageCheck]:
    """Check every image of ``rows`` in ``workers`` processes; the ones with problems, in ``rows`` order."""
    from tqdm import tqdm

    if not rows:
        return []
    size = min(CHUNK_IMAGES, -(-len(rows) // workers))  # a few images still spread over the workers
    chunks = [rows[start : start + size] for start in range(0, len(rows), size)]
    position = {row[1]: index for index, row in enumerate(rows)}
    found: list[ImageCheck] = []
    pool = ProcessPoolExecutor(max_workers=min(workers, len(chunks)), initializer=_silence_stderr)
    try:
        pending: dict = {}
        next_chunk = 0

        def submit_more() -> None:
            nonlocal next_chunk
            while next_chunk < len(chunks) and len(pending) < workers * TASKS_AHEAD_PER_WORKER:
                pending[pool.submit(_check_rows, image_dir, chunks[next_chunk])] = len(chunks[next_chunk])
                next_chunk += 1

        # The first submit starts the worker processes, before tqdm's monitor thread exists.
        submit_more()
        with tqdm(
            total=len(rows), unit="img", desc="checking images", file=sys.stderr, disable=not progress
        ) as bar:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    found.extend(future.result())
                    bar.update(pending.pop(future))
                submit_more()
    finally:
        # On Ctrl-C or a worker's error, queued tasks are dropped rather than run to the end.
        pool.shutdown(wait=True, cancel_futures=True)
    found.sort(key=lambda result: position[result.image_id])
    return found


def check_arguments(ann_file: str, image_dir: str, workers: int) -> None:
    """``DataCheckUsageError`` for a usage error: no such annotation file or image directory, workers < 1."""
    if workers < 1:
        raise DataCheckUsageError(f"--workers must be >= 1, got {workers}")
    if not Path(ann_file).is_file():
        raise DataCheckUsageError(f"{ann_file}: annotation file not found")
    if not Path(image_dir).is_dir():
        raise DataCheckUsageError(f"{image_dir}: image directory not found")


def run_data_check(ann_file: str, image_dir: str, workers: int, progress: bool = True) -> DataCheckReport:
    """Validate ``ann_file`` with the commands' reader, then check every image it names under
    ``image_dir``. Raises ``DataCheckUsageError`` for a usage error; data problems go into the report."""
    from trainer.datasets.annotations import DatasetError, load_wholebody_annotations

    check_arguments(ann_file, image_dir, workers)
    report = DataCheckReport(ann_file=str(ann_file), image_dir=str(image_dir), workers=workers)
    try:
        annotations = load_wholebody_annotations(ann_file)
    except DatasetError as err:
        report.annotation_error = str(err)
        return report
    rows = [
        (str(name), int(image_id), int(width), int(height))
        for image_id, name, width, height in zip(
            annotations.image_ids,
            annotations.file_names,
            annotations.image_widths,
            annotations.image_heights,
            strict=True,
        )
    ]
    report.images, report.annotations = len(rows), len(annotations.ann_ids)
    report.dropped_ann_ids = [
        int(i) for i in np.asarray(annotations.ann_ids)[~np.asarray(annotations.box_kept)]
    ]
    start = time.perf_counter()
    for result in check_image_files(str(image_dir), rows, workers, progress=progress):
        for problem in result.problems:
            report.problems[problem.kind].append(
                {"image_id": result.image_id, "file_name": result.file_name, "detail": problem.detail}
            )
    report.seconds = time.perf_counter() - start
    report.checked = len(rows)
    return report


def format_report(report: DataCheckReport, entries_per_heading: int | None = None) -> str:
    """The report as text: the annotation file's verdict, each problem heading with its images (at most
    ``entries_per_heading`` each; None: all), the result line."""
    lines = []
    if report.annotation_error is not None:
        lines.append(f"annotation file {report.ann_file}: INVALID: {report.annotation_error}")
        lines.append(f"images under {report.image_dir}: not checked (the annotation file is invalid)")
    else:
        lines.append(
            f"annotation file {report.ann_file}: valid ({report.images} images, {report.annotations} "
            "annotations)"
        )
        dropped = report.dropped_ann_ids
        shown_ids = dropped if entries_per_heading is None else dropped[:entries_per_heading]
        ids = ", ".join(map(str, shown_ids)) + (", ..." if len(shown_ids) < len(dropped) else "")
        lines.append(
            "annotations dropped by the data sets (box empty once clipped to its image, as MMPose does): "
            + (f"{len(dropped)} (ann ids {ids})" if dropped else "none")
        )
        rate = report.checked / report.seconds if report.seconds > 0 else 0.0
        lines.append(
            f"images under {report.image_dir}: {report.checked} checked in {report.seconds:.1f} s "
            f"({rate:.0f} images/s, {report.workers} worker process(es))"
        )
        for kind in PROBLEM_KINDS:
            entries = report.problems[kind]
            lines.append(f"{HEADINGS[kind]}: {len(entries) or 'none'}")
            shown = entries if entries_per_heading is None else entries[:entries_per_heading]
            for entry in shown:
                lines.append(f"  {entry['file_name']} (image_id={entry['image_id']}): {entry['detail']}")
            if len(shown) < len(entries):
                lines.append(f"  ... and {len(entries) - len(shown)} more (see {REPORT_TEXT})")
    if report.clean:
        lines.append("result: clean (every image present, decodable, complete and of its annotated size)")
    elif report.annotation_error is not None:
        lines.append("result: PROBLEMS (the annotation file is invalid)")
    else:
        lines.append(f"result: PROBLEMS ({report.problem_images} of {report.images} images)")
    return "\n".join(lines) + "\n"


def make_report_dir(out_dir: str) -> Path:
    """``out_dir``, created; ``DataCheckUsageError`` when it cannot be (checked before the long part)."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataCheckUsageError(f"{out_dir}: cannot create the report directory ({err})") from None
    return out


def write_report(report: DataCheckReport, out_dir: str) -> tuple[Path, Path]:
    """``report.txt`` (every entry) and ``report.json`` under ``out_dir`` (created)."""
    out = make_report_dir(out_dir)
    text_path, json_path = out / REPORT_TEXT, out / REPORT_JSON
    text_path.write_text(format_report(report))
    json_path.write_text(json.dumps(report.to_json(), indent=1) + "\n")
    return text_path, json_path


def data_check_command(
    ann_file: str, image_dir: str, workers: int | None, out_dir: str | None, progress: bool = True
) -> int:
    """The command: check, print, write the report; the exit status. ``workers`` None: the CPU count;
    ``out_dir`` None: ``./data_check``."""
    workers = default_workers() if workers is None else workers
    out_dir = DEFAULT_OUT_DIR if out_dir is None else out_dir
    try:
        check_arguments(ann_file, image_dir, workers)
        make_report_dir(out_dir)
        report = run_data_check(ann_file, image_dir, workers, progress=progress)
        text_path, json_path = write_report(report, out_dir)
    except DataCheckUsageError as err:
        print(f"fowkal data check: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fowkal data check: interrupted", file=sys.stderr)
        return 130
    print(format_report(report, entries_per_heading=CONSOLE_ENTRIES), end="")
    print(f"report: {text_path}, {json_path}")
    return 0 if report.clean else 1


__all__ = [
    "DEFAULT_OUT_DIR",
    "DataCheckReport",
    "DataCheckUsageError",
    "check_arguments",
    "check_image_files",
    "data_check_command",
    "default_workers",
    "format_report",
    "make_report_dir",
    "run_data_check",
    "write_report",
]
