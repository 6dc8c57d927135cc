"""Where Ray keeps what must outlive a process (Ray Train checkpoints, a sweep's Tune experiment): a local
directory or a pyarrow filesystem URI (``s3://bucket/prefix``, ``gs://...``; what a multi-node cluster
needs), with the one join, the check of ``--storage-path`` before anything starts, and existence tests that
work for both."""

from __future__ import annotations

import os
from pathlib import Path

from trainer.preflight import InputFileError


def is_storage_uri(path: str | None) -> bool:
    """True for a pyarrow filesystem URI (``s3://bucket/prefix``, ``gs://...``), not a local path."""
    return path is not None and "://" in str(path) and not str(path).startswith("file://")


def storage_join(root: str, *parts: str) -> str:
    """``root/part/...`` for a local path or a filesystem URI alike."""
    if is_storage_uri(root):
        return "/".join([str(root).rstrip("/"), *parts])
    return str(Path(root).joinpath(*parts))


class StorageError(InputFileError):
    """``--storage-path`` is a URI that cannot serve as Ray storage (unknown scheme, missing bucket, server
    unreachable); found before Ray or MLflow start (exit 2, as a missing input file)."""


def check_storage_path(storage: str, flag: str = "--storage-path") -> None:
    """Raise :class:`StorageError` naming ``flag`` and the URI if ``storage`` is a filesystem URI that pyarrow
    cannot open or whose bucket (the first component of its path) does not exist. Local paths pass."""
    if not is_storage_uri(storage):
        return
    import pyarrow.fs

    try:
        filesystem, path = pyarrow.fs.FileSystem.from_uri(storage)
    except ValueError as err:  # pyarrow's ArrowInvalid: an unknown scheme or a malformed URI
        raise StorageError(
            f"{flag} {storage!r}: not a filesystem URI that Ray storage (pyarrow) can open: {err}"
        ) from err
    except OSError as err:  # e.g. S3 resolving the bucket's region: no server, or no such bucket
        raise StorageError(f"{flag} {storage!r}: cannot reach the storage: {err}") from err
    bucket = path.strip("/").split("/", 1)[0]
    if not bucket:
        raise StorageError(f"{flag} {storage!r}: the URI names no bucket (e.g. s3://bucket/prefix)")
    try:
        info = filesystem.get_file_info(bucket)
    except OSError as err:
        raise StorageError(f"{flag} {storage!r}: cannot reach bucket {bucket!r}: {err}") from err
    if info.type == pyarrow.fs.FileType.NotFound:
        endpoint = os.environ.get("AWS_ENDPOINT_URL")
        where = f"{filesystem.type_name}" + (f" at {endpoint}" if endpoint else "")
        raise StorageError(f"{flag} {storage!r}: no bucket {bucket!r} on {where}: create it first")


def default_storage_path(config) -> str:
    """``<output_dir>/ray_results`` made absolute against the current directory."""
    return str((Path(config.output_dir).expanduser() / "ray_results").resolve())


def resolve_storage_path(storage_path: str | None, config) -> str:
    """Ray Train storage: a filesystem URI as given (every node reaches it: what a multi-node cluster
    needs), a local path made absolute, or :func:`default_storage_path`."""
    if not storage_path or not str(storage_path).strip():
        return default_storage_path(config)
    if is_storage_uri(storage_path):
        return str(storage_path).strip().rstrip("/")
    return str(Path(str(storage_path).removeprefix("file://")).expanduser().resolve())


def storage_is_file(path: str) -> bool:
    """A local file, or an object at a storage URI."""
    if not is_storage_uri(path):
        return Path(path).is_file()
    import pyarrow.fs

    filesystem, inner = pyarrow.fs.FileSystem.from_uri(path)
    return filesystem.get_file_info(inner).type == pyarrow.fs.FileType.File


def storage_exists(path: str) -> bool:
    """A local path, or an object or a prefix with objects under it at a storage URI."""
    if not is_storage_uri(path):
        return Path(path).exists()
    import pyarrow.fs

    filesystem, inner = pyarrow.fs.FileSystem.from_uri(path)
    if filesystem.get_file_info(inner).type != pyarrow.fs.FileType.NotFound:
        return True
    selector = pyarrow.fs.FileSelector(inner, allow_not_found=True, recursive=False)
    return bool(filesystem.get_file_info(selector))


__all__ = [
    "StorageError",
    "check_storage_path",
    "default_storage_path",
    "is_storage_uri",
    "resolve_storage_path",
    "storage_exists",
    "storage_is_file",
    "storage_join",
]
