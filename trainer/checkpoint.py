"""Training checkpoints: writing them atomically, reading them back, and rebuilding their model.

What a checkpoint is and where its config comes from
    A checkpoint is what ``trainer.loop.train_loop_per_worker`` writes: a ``.pt`` file (``best.pt``,
    ``latest.pt``), a Ray checkpoint directory holding ``checkpoint.pt`` or a plain run's ``checkpoints``
    directory (``best.pt`` is taken): a dict with ``model`` (the state dict) and ``config``
    (``config_to_dict`` of the run's ``TrainConfig``). A bare state dict is accepted too.
    The model is rebuilt by the run's family (``trainer.families``) from the run's own config (for the
    top-down family: backbone; KAF head when the loss variant has one), looked up in this order:

    1. the ``config`` stored in the checkpoint;
    2. a ``config.yaml`` in the checkpoint's directory or its parent (a run's downloaded MLflow artifacts
       are laid out as ``config.yaml`` + ``best_checkpoint/checkpoint.pt``; a plain run as
       ``<output_dir>/checkpoints/best.pt``);
    3. with ``--run``, the MLflow run's ``config.yaml`` artifact (``fowkal train`` logs it).

    The message printed at the start says which one was used.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from trainer.config import ConfigError, config_from_dict
from trainer.families import family_of

CHECKPOINT_FILE = "checkpoint.pt"  # inside a Ray checkpoint directory
CONFIG_FILE = "config.yaml"  # a run's config beside its checkpoint (and the MLflow artifact of that name)


class EvalError(ValueError):
    """Bad input to evaluation (``fowkal eval`` / ``fowkal show``); names the file, run or argument."""


class CheckpointMismatchError(EvalError):
    """The checkpoint's weights do not fit the model its config describes (architecture / keypoint count)."""


@dataclass
class LoadedCheckpoint:
    """A model rebuilt from a checkpoint, with the run config it was built from."""

    model: (
        Any  # the family's network (trainer.topdown.model.PoseModel for the top-down family), eval mode, CPU
    )
    config: Any  # trainer.config.TrainConfig
    checkpoint_path: Path
    config_source: str
    epoch: int | None
    label: str


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary name, then rename: a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by ``train_loop_per_worker`` (a ``.pt`` file or a Ray checkpoint directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"training checkpoint {str(path)!r} does not exist")
    return _read_state(path)


def load_ray_training_checkpoint(checkpoint: Any) -> dict[str, Any]:
    """The ``checkpoint.pt`` of a ``ray.train.Checkpoint``, read by this process alone from the storage
    the checkpoint lives on (a local or shared path, or object storage such as ``s3://``).

    Not ``Checkpoint.as_directory()``: it downloads into one temporary directory per checkpoint that the
    node's workers share, and a worker that takes the download lock after another released it downloads
    again over the files the first one is still reading (a resumed two-worker run read a torn file)."""
    path = f"{checkpoint.path.rstrip('/')}/{CHECKPOINT_FILE}"
    try:
        # Whole, in one read: torch.load's many small seeks would each be a ranged request on object storage.
        with checkpoint.filesystem.open_input_file(path) as stream:
            data = stream.read()
    except FileNotFoundError as error:
        raise FileNotFoundError(f"training checkpoint {path!r} does not exist") from error
    return _read_state(io.BytesIO(data))


def _read_state(source: Path | io.BytesIO) -> Any:
    """A checkpoint file's contents with its tensors on the CPU; ``weights_only``: no pickled code runs."""
    return torch.load(source, map_location="cpu", weights_only=True)


def checkpoint_file(path: Path) -> Path:
    """The checkpoint file at ``path``: the file itself, or inside a directory the Ray ``checkpoint.pt``,
    else a plain run's ``best.pt``, else ``latest.pt``."""
    if path.is_dir():
        # A Ray checkpoint directory, or a plain run's <output_dir>/checkpoints (best before latest).
        for name in (CHECKPOINT_FILE, "best.pt", "latest.pt"):
            if (path / name).is_file():
                return path / name
        raise EvalError(
            f"checkpoint directory {str(path)!r} holds no {CHECKPOINT_FILE}, best.pt or latest.pt"
        )
    if not path.is_file():
        raise EvalError(f"checkpoint {str(path)!r} does not exist")
    return path


def check_state_dict_fits(
    model: torch.nn.Module, weights: dict[str, torch.Tensor], checkpoint: Path, what: str
):
    """Raise ``CheckpointMismatchError`` naming the checkpoint and the first mismatching keys and shapes."""
    expected = model.state_dict()
    mismatched = [
        f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in weights and tuple(weights[k].shape) != tuple(v.shape)
    ]
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    if not (mismatched or missing or unexpected):
        return
    lines = [f"checkpoint {str(checkpoint)!r} does not fit {what}:"]
    for label, keys in (
        ("shape mismatches", mismatched),
        ("missing keys", missing),
        ("unexpected keys", unexpected),
    ):
        if keys:
            lines.append(f"  {len(keys)} {label}, first: {'; '.join(keys[:5])}")
    lines.append(
        "  (a checkpoint of another backbone or keypoint count, or a config that is not the checkpoint's own)"
    )
    raise CheckpointMismatchError("\n".join(lines))


def read_config_yaml(path: Path, origin: str):
    try:
        values = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise EvalError(f"could not read the run config {str(path)!r}: {err}") from err
    return config_from_dict(values if values is not None else {}, source=f"{path} ({origin})")


def load_checkpoint_model(
    checkpoint: str | os.PathLike, config_file: str | os.PathLike | None = None, config_origin: str = ""
) -> LoadedCheckpoint:
    """Rebuild the pose model of a training checkpoint with its own config (see the module docstring).

    Args:
        checkpoint: a ``.pt`` file or a Ray checkpoint directory (``checkpoint.pt`` inside).
        config_file: a config YAML to use when the checkpoint holds no config (e.g. a run's artifact);
            looked for beside the checkpoint when None.
        config_origin: where ``config_file`` came from, for messages.

    Raises:
        EvalError: missing or unreadable checkpoint, no config found.
        CheckpointMismatchError: weights of another architecture or keypoint count.
    """
    path = checkpoint_file(Path(checkpoint))
    try:
        state = _read_state(path)
    except Exception as err:  # torch raises many types for corrupt or non-checkpoint files
        raise EvalError(f"could not read checkpoint {str(path)!r}: {err}") from err
    if not isinstance(state, dict):
        raise EvalError(f"checkpoint {str(path)!r} holds a {type(state).__name__}, not a dict")
    if isinstance(state.get("model"), dict):
        weights = state["model"]
    elif state and all(isinstance(v, torch.Tensor) for v in state.values()):
        weights, state = state, {}
    else:
        raise EvalError(
            f"checkpoint {str(path)!r} has no 'model' state dict (keys: {sorted(map(str, state))[:10]})"
        )
    weights = {str(k).removeprefix("module."): v for k, v in weights.items()}

    try:
        if isinstance(state.get("config"), dict):
            config = config_from_dict(state["config"], source=f"{path} (stored config)")
            source = "the config stored in the checkpoint"
        else:
            candidates = [Path(config_file)] if config_file is not None else []
            candidates += [path.parent / CONFIG_FILE, path.parent.parent / CONFIG_FILE]
            found = next((c for c in candidates if c.is_file()), None)
            if found is None:
                raise EvalError(
                    f"checkpoint {str(path)!r} holds no config and no {CONFIG_FILE} was found "
                    f"(looked at {', '.join(str(c) for c in candidates)})"
                )
            origin = config_origin if config_file is not None and found == Path(config_file) else "beside it"
            config = read_config_yaml(found, origin or "config file")
            source = f"{found} ({origin or 'config file'})"
    except ConfigError as err:
        raise EvalError(f"checkpoint {str(path)!r}: its config is not valid: {err}") from err

    family = family_of(config)
    model = family.build_model(config, pretrained=False)
    what = f"the {family.name} family's {family.describe_model(config)} (config from {source})"
    check_state_dict_fits(model, weights, path, what)
    model.load_state_dict(weights, strict=True)
    model.eval()
    epoch = state.get("epoch")
    return LoadedCheckpoint(
        model=model,
        config=config,
        checkpoint_path=path,
        config_source=source,
        epoch=int(epoch) if isinstance(epoch, int | float) else None,
        label=f"{config.name} ({family.run_label(config)})",
    )


__all__ = [
    "CHECKPOINT_FILE",
    "CONFIG_FILE",
    "CheckpointMismatchError",
    "EvalError",
    "LoadedCheckpoint",
    "check_state_dict_fits",
    "checkpoint_file",
    "load_checkpoint_model",
    "load_ray_training_checkpoint",
    "load_training_checkpoint",
    "read_config_yaml",
    "save_atomic",
]
