"""--storage-path: a filesystem URI (s3://, gs://) stays as given; a local path becomes absolute."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.runs.train import default_storage_path, is_storage_uri, resolve_storage_path
from trainer.config import config_from_dict


def test_storage_uris_stay_uris_and_local_paths_become_absolute(tmp_path, monkeypatch):
    config = config_from_dict({"name": "x", "output_dir": str(tmp_path / "out")})
    assert resolve_storage_path("s3://bucket/prefix/", config) == "s3://bucket/prefix"
    assert resolve_storage_path("gs://bucket/a", config) == "gs://bucket/a"
    assert is_storage_uri("s3://b/p") and not is_storage_uri("/shared/ray") and not is_storage_uri(None)
    monkeypatch.chdir(tmp_path)
    assert resolve_storage_path("rel/ray", config) == str((tmp_path / "rel" / "ray").resolve())
    assert resolve_storage_path("file:///shared/ray", config) == str(Path("/shared/ray").resolve())
    assert resolve_storage_path(None, config) == default_storage_path(config)
    assert resolve_storage_path("  ", config) == default_storage_path(config)


def test_a_worker_reads_a_remote_ray_checkpoint_itself_without_the_shared_download_dir(tmp_path, monkeypatch):
    """Resuming reads checkpoint.pt straight from the checkpoint's filesystem into this process: no
    ``as_directory()`` download into the per-checkpoint temporary directory a node's workers share (a
    second worker's download rewrote the file the first was reading)."""
    import pyarrow.fs
    import torch
    from ray.train import Checkpoint

    from trainer.checkpoint import CHECKPOINT_FILE, load_ray_training_checkpoint

    storage = tmp_path / "storage"
    (storage / "trial" / "checkpoint_000001").mkdir(parents=True)
    state = {"epoch": 3, "weights": torch.arange(5.0)}
    torch.save(state, storage / "trial" / "checkpoint_000001" / CHECKPOINT_FILE)
    # A filesystem that is not LocalFileSystem, as s3:// is: as_directory() would download it.
    remote = pyarrow.fs.SubTreeFileSystem(str(storage), pyarrow.fs.LocalFileSystem())
    checkpoint = Checkpoint("trial/checkpoint_000001", filesystem=remote)

    def shared_download(*args, **kwargs):
        raise AssertionError("downloaded into the node's shared temporary checkpoint directory")

    monkeypatch.setattr(Checkpoint, "to_directory", shared_download)
    monkeypatch.setattr(Checkpoint, "as_directory", shared_download)

    loaded = load_ray_training_checkpoint(checkpoint)
    assert loaded["epoch"] == 3 and torch.equal(loaded["weights"], state["weights"])

    missing = Checkpoint("trial/checkpoint_000009", filesystem=remote)
    with pytest.raises(FileNotFoundError, match="checkpoint_000009/checkpoint.pt"):
        load_ray_training_checkpoint(missing)
