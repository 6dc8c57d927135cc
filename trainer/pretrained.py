"""Backbone weights from a local file, for every family: reading ``.safetensors`` / ``.pth`` files (never a
download), and the one error that names the file and what does not fit."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch


class PretrainedWeightsError(ValueError):
    """A pretrained weights file that is missing, unreadable or does not fit the backbone."""


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (``.safetensors``, ``.pth``, ``.pt``, ``.bin``), unwrapped from a
    training checkpoint's ``state_dict`` / ``model`` and DDP's ``module.``; of a whole model's weights, the
    ``backbone.`` part."""
    if not path.is_file():
        raise PretrainedWeightsError(f"pretrained weights file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        elif suffix in (".pth", ".pt", ".bin"):
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise PretrainedWeightsError(
                f"pretrained weights file {str(path)!r}: unknown suffix {suffix!r} "
                "(expected .safetensors, .pth, .pt or .bin)"
            )
    except PretrainedWeightsError:
        raise
    except Exception as err:  # torch/safetensors raise many types for corrupt or unsafe files
        raise PretrainedWeightsError(f"could not read pretrained weights file {str(path)!r}: {err}") from err
    # Training checkpoints often wrap the weights.
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedWeightsError(
            f"pretrained weights file {str(path)!r} does not hold a state dict of tensors"
        )
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):  # a whole model's weights: take the backbone part
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    return state


def check_fits(
    path: Path,
    backbone_name: str,
    state: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    unexpected: Iterable[str],
    optional: Iterable[str] = (),
) -> None:
    """Raise :class:`PretrainedWeightsError` naming ``path`` and the first shape mismatches, missing keys
    (those of ``expected`` not in ``state`` nor ``optional``) and ``unexpected`` keys."""
    optional = set(optional)
    missing = [k for k in expected if k not in state and k not in optional]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    unexpected = list(unexpected)
    if not (missing or mismatched or unexpected):
        return
    lines = [f"pretrained weights file {str(path)!r} does not fit backbone {backbone_name!r}:"]
    problems = (("shape mismatches", mismatched), ("missing keys", missing), ("unexpected keys", unexpected))
    for label, keys in problems:
        if keys:
            lines.append(f"  {len(keys)} {label}, first: {', '.join(keys[:5])}")
    raise PretrainedWeightsError("\n".join(lines))


__all__ = ["PretrainedWeightsError", "check_fits", "read_state_dict"]
