"""--storage-path: a filesystem URI (s3://, gs://) stays as given; a local path becomes absolute."""

from __future__ import annotations

from pathlib import Path

from orchestrator.train import default_storage_path, is_storage_uri, resolve_storage_path
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
