"""One copy per node of a parsed annotation file: compact NumPy arrays in a cache directory, memory-mapped.

The first process that needs an annotation file converts it (``convert(path) -> dict of arrays``) and writes
the arrays as ``.npy`` files plus ``meta.json`` into a temporary directory, then renames it into place, all
under an exclusive ``fcntl`` lock on ``<entry>.lock``: concurrent processes on a node (or nodes sharing a file
system) never see a half-written entry and never convert twice at once. Later processes memory-map the
arrays read-only, so every training worker of a node and all their DataLoader processes share the same page
cache pages instead of each holding a private copy.

An entry is keyed by the source file's absolute path, size, modification time and a hash of its first MiB; a
changed file gets a new entry (older entries of the same path are removed). Opening an entry checks its
format version, the source key and the shape, dtype and CRC-32 of every array: a stale or corrupt entry is
rebuilt, never trusted. ``convert`` raises on malformed input before anything is written. A cache directory
that cannot be written (read-only file system) falls back to converting in memory, with a warning.

``CachedArrays`` pickles as its entry path (not the data) and reopens the memory maps lazily after
unpickling, so DataLoader workers and Ray workers receive a few hundred bytes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

# Bumped whenever the array layout or the conversion changes, so older entries are rebuilt (2: the clipped
# GT boxes and which of them are kept).
FORMAT_VERSION = 2
_HEAD_BYTES = 1 << 20
_META = "meta.json"
_CRC_CHUNK = 8 << 20


class CacheCorruptError(RuntimeError):
    """A cache entry that exists but does not match its metadata (it is rebuilt)."""


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/fowkal`` or ``~/.cache/fowkal`` (the XDG base directory convention)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fowkal"


def source_key(path: Path) -> dict:
    """What identifies a version of ``path``: absolute path, size, mtime (ns) and a hash of its head."""
    stat = path.stat()
    with open(path, "rb") as handle:
        head = hashlib.sha256(handle.read(_HEAD_BYTES)).hexdigest()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "head": head}


def _entry_name(kind: str, key: dict) -> str:
    digest = hashlib.sha256(json.dumps([FORMAT_VERSION, kind, key], sort_keys=True).encode()).hexdigest()
    return f"{Path(key['path']).stem}.{kind}.{digest[:20]}"


def _crc(array: np.ndarray) -> int:
    return zlib.crc32(
        np.ascontiguousarray(array).tobytes()
        if array.size == 0
        else memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    )


def _file_crc(path: Path, offset: int) -> int:
    """CRC-32 of ``path`` from ``offset`` on, read through a small buffer: the check fills the page cache,
    not this process's resident memory, which the memory map only pays for pages it touches."""
    crc = 0
    buffer = bytearray(_CRC_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        handle.seek(offset)
        while count := handle.readinto(buffer):
            crc = zlib.crc32(view[:count], crc)
    return crc


class CachedArrays:
    """Read-only arrays by name, memory-mapped from a cache entry (or held in memory without a cache)."""

    def __init__(self, arrays: dict[str, np.ndarray] | None = None, entry: Path | None = None) -> None:
        self._arrays = arrays
        self.entry = None if entry is None else Path(entry)

    def __getitem__(self, name: str) -> np.ndarray:
        if self._arrays is None:  # after unpickling: reopen the maps (checked when the entry was opened)
            self._arrays = _map_arrays(self.entry, verify=False)
        return self._arrays[name]

    def __contains__(self, name: str) -> bool:
        if self._arrays is None:
            self._arrays = _map_arrays(self.entry, verify=False)
        return name in self._arrays

    def __getstate__(self) -> dict:
        if self.entry is not None:
            return {"entry": str(self.entry), "arrays": None}
        return {"entry": None, "arrays": self._arrays}

    def __setstate__(self, state: dict) -> None:
        self.entry = None if state["entry"] is None else Path(state["entry"])
        self._arrays = state["arrays"]


def _map_arrays(entry: Path, verify: bool, key: dict | None = None) -> dict[str, np.ndarray]:
    """Memory-map every array of ``entry``; with ``verify``, check it against its metadata (and ``key``)."""
    try:
        meta = json.loads((entry / _META).read_text())
    except FileNotFoundError:
        raise  # no entry yet
    except (OSError, ValueError) as error:
        raise CacheCorruptError(f"{entry}: unreadable {_META}: {error}") from None
    if meta.get("version") != FORMAT_VERSION or (key is not None and meta.get("source") != key):
        raise CacheCorruptError(f"{entry}: metadata does not match the source file or format version")
    arrays = {}
    for name, info in meta["arrays"].items():
        file = entry / f"{name}.npy"
        empty = 0 in info["shape"]  # an empty file cannot be memory-mapped
        try:
            array = np.load(file, mmap_mode=None if empty else "r", allow_pickle=False)
        except (OSError, ValueError) as error:
            raise CacheCorruptError(f"{entry}: array {name!r} unreadable: {error}") from None
        if list(array.shape) != info["shape"] or array.dtype.str != info["dtype"]:
            raise CacheCorruptError(
                f"{entry}: array {name!r} is {array.dtype.str}{list(array.shape)}, "
                f"metadata says {info['dtype']}{info['shape']}"
            )
        if verify and (_crc(array) if empty else _file_crc(file, array.offset)) != info["crc32"]:
            raise CacheCorruptError(f"{entry}: array {name!r} fails its CRC-32 check")
        arrays[name] = array
    return arrays


def _write_entry(entry: Path, arrays: dict[str, np.ndarray], key: dict) -> None:
    """Write ``arrays`` to a temporary sibling of ``entry`` and rename it into place."""
    tmp = Path(tempfile.mkdtemp(prefix=entry.name + ".tmp-", dir=entry.parent))
    try:
        meta = {"version": FORMAT_VERSION, "source": key, "arrays": {}}
        for name, array in arrays.items():
            array = np.ascontiguousarray(array)
            with open(tmp / f"{name}.npy", "wb") as handle:
                np.save(handle, array, allow_pickle=False)
                handle.flush()
                os.fsync(handle.fileno())
            meta["arrays"][name] = {
                "shape": list(array.shape),
                "dtype": array.dtype.str,
                "crc32": _crc(array),
            }
        with open(tmp / _META, "w") as handle:  # written last: an entry without it is incomplete
            json.dump(meta, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o755)
        os.rename(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_older_entries(cache_dir: Path, kind: str, key: dict, keep: Path) -> None:
    """Best effort: drop entries of earlier versions of the same source file (open maps stay valid)."""
    for other in cache_dir.glob(f"{Path(key['path']).stem}.{kind}.*"):
        if other == keep or not other.is_dir() or ".tmp-" in other.name:
            continue
        with contextlib.suppress(OSError, ValueError, KeyError):
            if json.loads((other / _META).read_text())["source"]["path"] == key["path"]:
                shutil.rmtree(other)


def cached_arrays(
    path: str | os.PathLike,
    kind: str,
    convert: Callable[[Path], dict[str, np.ndarray]],
    cache_dir: str | os.PathLike | None = None,
) -> CachedArrays:
    """The arrays ``convert(path)`` returns, converted once per cache directory and memory-mapped.

    Args:
        path: the source file.
        kind: names the conversion (part of the entry name, so two conversions of one file do not collide).
        convert: parses and validates ``path``; raises on malformed input (nothing is written then).
        cache_dir: where entries live; None = ``default_cache_dir()``.
    """
    path = Path(path)
    key = source_key(path)  # FileNotFoundError for a missing file, before any cache work
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        logger.warning("annotation cache %s unusable (%s): converting %s in memory", cache_dir, error, path)
        return CachedArrays(arrays=convert(path))
    entry = cache_dir / _entry_name(kind, key)
    with contextlib.suppress(FileNotFoundError, CacheCorruptError):
        return CachedArrays(arrays=_map_arrays(entry, verify=True, key=key), entry=entry)
    try:
        lock = open(cache_dir / f"{entry.name}.lock", "a+")  # noqa: SIM115 (held until the entry exists)
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
    except OSError as error:
        logger.warning("annotation cache %s unusable (%s): converting %s in memory", cache_dir, error, path)
        return CachedArrays(arrays=convert(path))
    try:
        try:  # another process may have finished the entry while this one waited for the lock
            return CachedArrays(arrays=_map_arrays(entry, verify=True, key=key), entry=entry)
        except (FileNotFoundError, CacheCorruptError) as error:
            if entry.exists():  # corrupt, or a directory without its metadata: never trusted
                logger.warning("rebuilding corrupt annotation cache entry %s: %s", entry, error)
                shutil.rmtree(entry, ignore_errors=True)
        arrays = convert(path)
        try:
            _write_entry(entry, arrays, key)
        except OSError as error:
            logger.warning("could not write annotation cache %s (%s): using %s in memory", entry, error, path)
            return CachedArrays(arrays=arrays)
        _remove_older_entries(cache_dir, kind, key, keep=entry)
        del arrays  # the in-memory copy goes; the maps share the page cache with the other processes
        return CachedArrays(arrays=_map_arrays(entry, verify=False, key=key), entry=entry)
    finally:
        lock.close()  # releases the lock


__all__ = ["CacheCorruptError", "CachedArrays", "FORMAT_VERSION", "cached_arrays", "default_cache_dir"]
