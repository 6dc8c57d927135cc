"""What the inference-time sweeps' caches share (the top-down family's heatmap cache, KAPAO's candidate
cache): a file's identity in a cache key, the key's digest, and the lock under which concurrent builders
compute a cache once."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from pathlib import Path


def file_identity(path: str | os.PathLike | None) -> list | None:
    """The resolved path, size and modification time of ``path`` (None for None): it changes, the key does."""
    if path is None:
        return None
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return [str(resolved), stat.st_size, stat.st_mtime_ns]


def key_digest(payload: dict) -> str:
    """16 hex digits of a cache key's JSON payload."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def locked(path: str | os.PathLike):
    """An exclusive ``flock`` on ``path`` (created if absent) while the block runs."""
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
