"""The batched decoding path against today's reference (before the flip-back copy and the fixed-order DARK
blur): the same keypoints to float32 resolution, and a box's keypoints independent of the boxes decoded
beside it (what lets ``fowkal tune-eval`` decode every box once per (flip mode, kernel) and still equal
``fowkal eval`` at any box selection)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import trainer.topdown.codec as codec
from trainer.config import EvalConfig
from trainer.datasets.keypoints import NUM_KEYPOINTS, flip_index
from trainer.topdown.codec import FLIP_MODES, decode_dark, encode_unbiased, flip_back_heatmaps
from trainer.topdown.inference import decode_heatmaps

HEATMAP_W, HEATMAP_H = 48, 64
IMAGE_PX_PER_HEATMAP_PX = 200 / HEATMAP_W  # a 200-pixel-wide person box


def reference_flip_back(heatmaps: torch.Tensor, mode: str, stride: float = 4.0) -> torch.Tensor:
    """flip_back_heatmaps as it was: index_select, then flip + cat, or the exact matrix."""
    swapped = heatmaps.index_select(1, torch.as_tensor(flip_index()))
    if mode == "exact":
        dtype = heatmaps.dtype if heatmaps.dtype in (torch.float32, torch.float64) else torch.float32
        matrix = codec._exact_flip_matrix(heatmaps.shape[-1], stride, dtype, heatmaps.device)
        return (swapped.to(dtype) @ matrix).to(heatmaps.dtype)
    flipped = swapped.flip(-1)
    return torch.cat([flipped[..., :1], flipped[..., :-1]], dim=-1) if mode == "shift" else flipped


def reference_decode_dark(heatmaps, blur_kernel: int):
    """decode_dark as it was: the 5x5 stencil blurred by two batched products over the whole batch."""
    original = codec._blur_stencil
    codec._blur_stencil = lambda patch, rows, cols: rows.transpose(1, 2) @ (patch @ cols)
    try:
        return decode_dark(heatmaps, blur_kernel)
    finally:
        codec._blur_stencil = original


def realistic_heatmaps(num: int = 24, noise: float = 0.01, seed: int = 0) -> torch.Tensor:
    """A trained model's maps, roughly: a sigma-2 Gaussian per keypoint at a sub-pixel place (some off the
    map), amplitudes 0.05-1, low noise."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform([-3.0, -3.0], [HEATMAP_W + 2.0, HEATMAP_H + 2.0], size=(num, NUM_KEYPOINTS, 2))
    maps, _ = encode_unbiased(centres, np.ones((num, NUM_KEYPOINTS)), (HEATMAP_W, HEATMAP_H), 2.0)
    maps *= rng.uniform(0.05, 1.0, size=(num, NUM_KEYPOINTS, 1, 1)).astype(np.float32)
    maps += rng.normal(0.0, noise, maps.shape).astype(np.float32)
    return torch.from_numpy(maps)


@pytest.mark.parametrize("mode", FLIP_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_flip_back_equals_the_reference_bit_for_bit(mode, dtype):
    maps = realistic_heatmaps(5).to(dtype)
    expected = reference_flip_back(maps, mode)
    actual = flip_back_heatmaps(maps, mode=mode)
    assert actual.dtype == dtype and actual.shape == maps.shape
    assert torch.equal(actual, expected)
    # NumPy in, NumPy out; a non-contiguous view reads as its values.
    assert np.array_equal(flip_back_heatmaps(maps.numpy(), mode=mode), expected.numpy())
    strided = maps.transpose(0, 1).contiguous().transpose(0, 1)
    assert not strided.is_contiguous() and torch.equal(flip_back_heatmaps(strided, mode=mode), expected)


@pytest.mark.parametrize("noise", [0.0, 0.01])
@pytest.mark.parametrize("kernel", [3, 7, 11, 15])
def test_dark_equals_todays_decoding_to_float32_resolution(noise, kernel):
    maps = realistic_heatmaps(noise=noise, seed=kernel)
    coords, scores = decode_dark(maps, kernel)
    expected, expected_scores = reference_decode_dark(maps, kernel)
    assert torch.equal(scores, expected_scores)
    # The reference sums its blur with batched matrix products whose order is the CPU's BLAS kernel's
    # (an AVX-512 machine rounds them differently from an AVX2 one; the reference even moves with the batch
    # it is decoded in); DARK's Newton step then amplifies those roundings by the log-Hessian's conditioning.
    # So: within 16 float32 steps of the coordinate (one is 3.8e-6 px at x in [32, 64)), and below 1e-4
    # image px, far below what moves an OKS; measured here, up to 11 steps and 6.4e-5 px.
    ulp = torch.from_numpy(np.spacing(np.abs(expected.numpy()).astype(np.float32)))
    assert bool(((coords - expected).abs() <= 16 * ulp).all())
    assert float((coords - expected).abs().max()) * IMAGE_PX_PER_HEATMAP_PX < 1e-4


@pytest.mark.parametrize("mode", FLIP_MODES)
def test_a_box_decodes_the_same_whatever_boxes_share_its_batch(mode):
    maps, mirrored = realistic_heatmaps(40, seed=1), realistic_heatmaps(40, seed=2)
    center = np.random.default_rng(3).uniform(50, 500, size=(40, 2))
    scale = np.tile([[150.0, 200.0]], (40, 1))
    full = decode_heatmaps(maps, mirrored, center, scale, mode, 4.0, 11)
    for rows in (slice(7, 19), slice(1, 2), slice(33, 40)):
        part = decode_heatmaps(
            maps[rows].clone(), mirrored[rows].clone(), center[rows], scale[rows], mode, 4.0, 11
        )
        assert np.array_equal(part[0], full[0][rows]) and np.array_equal(part[1], full[1][rows])


def test_decode_dark_takes_its_default_kernel_from_eval_config(monkeypatch):
    maps = realistic_heatmaps(3)
    default, _ = decode_dark(maps)
    assert torch.equal(default, decode_dark(maps, EvalConfig.blur_kernel)[0])
    monkeypatch.setattr(EvalConfig, "blur_kernel", 3)
    assert torch.equal(decode_dark(maps)[0], decode_dark(maps, 3)[0])
    assert not torch.equal(decode_dark(maps)[0], default)
