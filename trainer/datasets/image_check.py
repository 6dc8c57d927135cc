"""One image file checked as the data sets read it (``fowkal data check``): present, decodable by OpenCV
(``cv2.imread``, what the data sets decode with), not cut short (``truncation_problem``: OpenCV decodes a
truncated JPEG/PNG without an error, the missing rows grey) and of the width and height its annotation
says (read from the decoded array, so EXIF rotation counts as the data sets see it). Pure: no Ray, no
MLflow; one call per image, safe in any process."""

from __future__ import annotations

import os
from dataclasses import dataclass

import cv2

from trainer.datasets.common import truncation_problem

# The kinds of problem, in the order a report lists them.
MISSING = "missing"
UNREADABLE = "unreadable"
TRUNCATED = "truncated"
SIZE_MISMATCH = "size_mismatch"
PROBLEM_KINDS: tuple[str, ...] = (MISSING, UNREADABLE, TRUNCATED, SIZE_MISMATCH)


@dataclass(frozen=True)
class ImageProblem:
    """One thing wrong with an image file: its kind (one of ``PROBLEM_KINDS``) and what was seen."""

    kind: str
    detail: str


@dataclass(frozen=True)
class ImageCheck:
    """What one annotation file entry's image file is like: no problems when it is fine."""

    image_id: int
    file_name: str
    problems: tuple[ImageProblem, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems


def check_image(image_dir: str, file_name: str, image_id: int, width: int, height: int) -> ImageCheck:
    """Check the file ``image_dir/file_name`` of the annotation's image ``image_id`` (``width`` x
    ``height`` pixels). A file both truncated and of another size has both problems; an undecodable one
    is only unreadable (its size cannot be known)."""
    path = os.path.join(image_dir, file_name)
    if not os.path.isfile(path):
        return ImageCheck(image_id, file_name, (ImageProblem(MISSING, "no such file"),))
    try:
        truncated = truncation_problem(path)
    except OSError as err:  # e.g. no read permission
        return ImageCheck(image_id, file_name, (ImageProblem(UNREADABLE, f"cannot be read ({err})"),))
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        detail = "not a decodable image" + (f"; {truncated}" if truncated else "")
        return ImageCheck(image_id, file_name, (ImageProblem(UNREADABLE, detail),))
    problems = []
    if truncated is not None:
        problems.append(ImageProblem(TRUNCATED, truncated))
    decoded_height, decoded_width = image.shape[:2]
    if (decoded_width, decoded_height) != (int(width), int(height)):
        problems.append(
            ImageProblem(
                SIZE_MISMATCH,
                f"decoded {decoded_width}x{decoded_height}, the annotation says {int(width)}x{int(height)}",
            )
        )
    return ImageCheck(image_id, file_name, tuple(problems))


__all__ = [
    "MISSING",
    "PROBLEM_KINDS",
    "SIZE_MISMATCH",
    "TRUNCATED",
    "UNREADABLE",
    "ImageCheck",
    "ImageProblem",
    "check_image",
]
