"""The inference cost of a model on a few images: parameters, FLOPs, and the latency of its forward pass and
of its post-processing, per image at batch 1 and batched.

What differs between families (which images, how one image becomes a network input, what post-processing
turns the outputs into poses) comes from the family (``ExperimentFamily.latency_probe`` returns a
:class:`LatencyProbe`); this module times it, the same way for every family. One path for the cost a finished
run logs (``orchestrator.runs.outputs``) and for ``bench/kapao.py --latency``, so both measure the same thing.

Single pass: no flip test and no test-time augmentation, for either family. The top-down family's person
detector is not part of it (its inputs are crops of given boxes).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

# Images a finished run is probed on (the first of its val set, by image id): a few, to stay cheap.
PROBE_IMAGES = 4

# The metrics of :func:`inference_cost` (all per image; ms; FLOPs are 2 x multiply-adds).
COST_METRICS: tuple[str, ...] = (
    "cost/params",
    "cost/flops_per_image",
    "cost/flops_per_input",
    "cost/inputs_per_image",
    "latency/forward_ms_b1",
    "latency/post_ms_b1",
    "latency/total_ms_b1",
    "latency/forward_ms_batched",
    "latency/post_ms_batched",
    "latency/total_ms_batched",
    "latency/batch_images",
    "latency/poses_per_image",
    "latency/threads",
    "latency/on_gpu",
)


@dataclass
class LatencyProbe:
    """What a family hands the timer for a few images.

    ``inputs[i]``: image i's network input on the CPU (``[n_i, 3, H, W]``: its n_i person crops, or 1 whole
    image); ``forward(model, x)``: the network on a batch of inputs (``x`` on the model's device);
    ``post(outputs, indices)``: the family's post-processing of ``forward``'s outputs for the images at
    ``indices`` (their inputs concatenated in that order) into poses; returns how many poses it kept.
    """

    inputs: list[torch.Tensor]
    forward: Callable[[torch.nn.Module, torch.Tensor], object]
    post: Callable[[object, Sequence[int]], int]

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("a latency probe needs at least one image")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(model: torch.nn.Module, forward, x: torch.Tensor) -> int:
    """FLOPs of ``forward(model, x)`` as torch's ``FlopCounterMode`` counts them (2 per multiply-add, the
    convolutions and matrix products; not the element-wise operations)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        forward(model, x)
    return int(counter.get_total_flops())


@torch.no_grad()
def inference_cost(
    model: torch.nn.Module,
    probe: LatencyProbe,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    repeats: int = 1,
) -> dict[str, float]:
    """The :data:`COST_METRICS` of ``model`` on ``probe``'s images: each image alone (batch 1: its crops
    together, or its one whole image), then all of them in one batch; per image, after one untimed warm-up of
    each shape. ``forward`` ends when the outputs are ready on the device, ``post`` when the poses are.
    ``repeats`` > 1 (a benchmark on a shared machine): each measurement the best of that many."""
    device = torch.device(device)
    model = model.to(device).eval()
    n = len(probe.inputs)

    def to_device(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device)
        return x.contiguous(memory_format=torch.channels_last) if channels_last and x.ndim == 4 else x

    def best(x: torch.Tensor, indices: Sequence[int]) -> tuple[float, float, int]:
        runs = [timed(x, indices) for _ in range(max(int(repeats), 1))]
        return min(r[0] for r in runs), min(r[1] for r in runs), runs[0][2]

    def timed(x: torch.Tensor, indices: Sequence[int]) -> tuple[float, float, int]:
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            outputs = probe.forward(model, x)
        _sync(device)
        forwarded = time.perf_counter()
        poses = probe.post(outputs, indices)
        _sync(device)
        return forwarded - start, time.perf_counter() - forwarded, int(poses)

    singles = [to_device(x) for x in probe.inputs]
    timed(singles[0], [0])  # warm-up: allocator, cuDNN's algorithm choice, lazy imports
    forward_s = post_s = 0.0
    poses = 0
    for i, x in enumerate(singles):
        f, p, kept = best(x, [i])
        forward_s, post_s, poses = forward_s + f, post_s + p, poses + kept
    batch = torch.cat(singles)
    timed(batch, range(n))  # warm-up of the batched shape
    batch_forward_s, batch_post_s, _ = best(batch, range(n))

    inputs_per_image = sum(int(x.shape[0]) for x in probe.inputs) / n
    flops_per_input = count_flops(model, probe.forward, singles[0][:1])
    ms = 1e3 / n  # seconds over n images -> ms per image
    return {
        "cost/params": float(sum(p.numel() for p in model.parameters())),
        "cost/flops_per_image": float(flops_per_input * inputs_per_image),
        "cost/flops_per_input": float(flops_per_input),
        "cost/inputs_per_image": float(inputs_per_image),
        "latency/forward_ms_b1": forward_s * ms,
        "latency/post_ms_b1": post_s * ms,
        "latency/total_ms_b1": (forward_s + post_s) * ms,
        "latency/forward_ms_batched": batch_forward_s * ms,
        "latency/post_ms_batched": batch_post_s * ms,
        "latency/total_ms_batched": (batch_forward_s + batch_post_s) * ms,
        "latency/batch_images": float(n),
        "latency/poses_per_image": poses / n,
        "latency/threads": float(torch.get_num_threads()),
        "latency/on_gpu": float(device.type == "cuda"),
    }


def first_images(image_ids: Sequence[int], count: int, wanted: Sequence[int] | None = None) -> list[int]:
    """The image ids to probe: ``wanted`` (each must be among ``image_ids``), else the ``count`` smallest."""
    available = sorted({int(i) for i in image_ids})
    if wanted is None:
        return available[: max(int(count), 1)]
    missing = sorted({int(i) for i in wanted} - set(available))
    if missing:
        raise ValueError(f"image ids {missing[:5]} are not in the data set's samples")
    return [int(i) for i in wanted]


__all__ = ["COST_METRICS", "PROBE_IMAGES", "LatencyProbe", "count_flops", "first_images", "inference_cost"]
