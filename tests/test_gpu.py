"""CUDA paths: the fused loss, DARK decoding, flip-back, a bf16 autocast training step and channels-last.

Marked ``gpu``; every test skips (saying why) where torch sees no CUDA device. ``FOWKAL_TEST_DEVICE=cpu``
runs the same bodies on the CPU instead (``bench/gpu_check.sh --dry-run`` does, so that the one GPU run
cannot fail on a typo); there the CUDA-vs-CPU comparisons are CPU-vs-CPU and prove nothing about CUDA.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from trainer.codec import FLIP_MODES, decode_dark, encode_unbiased, flip_back_heatmaps
from trainer.keypoints import NUM_KEYPOINTS
from trainer.losses import LOSS_VARIANTS, HeatmapLoss
from trainer.model import build_pose_model

DEVICE = torch.device(os.environ.get("FOWKAL_TEST_DEVICE", "cuda"))

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEVICE.type == "cuda" and not torch.cuda.is_available(),
        reason="needs CUDA: torch sees no GPU here (FOWKAL_TEST_DEVICE=cpu runs the bodies on the CPU)",
    ),
]

VARIANTS = tuple(LOSS_VARIANTS)


def _heatmap_batch(batch: int, height: int, width: int, seed: int, noise: float = 0.05):
    """Gaussian targets at random sub-pixel keypoints, some invisible, and a noisy prediction of them."""
    rng = np.random.default_rng(seed)
    keypoints = rng.uniform([-2.0, -2.0], [width + 1.0, height + 1.0], size=(batch, NUM_KEYPOINTS, 2))
    visible = (rng.random((batch, NUM_KEYPOINTS)) > 0.2).astype(np.float32)
    target, weight = encode_unbiased(keypoints, visible, heatmap_size=(width, height))
    pred = target + noise * rng.standard_normal(target.shape).astype(np.float32)
    return torch.from_numpy(pred), torch.from_numpy(target), torch.from_numpy(weight), keypoints


def _loss_value_and_grads(variant: str, fused: bool, device: torch.device, dtype: torch.dtype):
    pred, target, weight, _ = _heatmap_batch(4, 64, 48, seed=1)
    kaf = torch.from_numpy(np.random.default_rng(2).uniform(0.05, 0.95, (4, NUM_KEYPOINTS)))
    x = pred.to(device, dtype).requires_grad_()
    lam = kaf.to(device, dtype).requires_grad_() if LOSS_VARIANTS[variant].needs_kaf else None
    loss = HeatmapLoss(variant, fused=fused)
    total = loss(x, target.to(device, dtype), weight.to(device, dtype), lam)
    grads = torch.autograd.grad(total, [x] if lam is None else [x, lam])
    return total.detach().double().cpu(), [g.double().cpu() for g in grads]


@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_and_unfused_loss_agree_on_cuda_and_with_the_cpu(variant):
    fused_value, fused_grads = _loss_value_and_grads(variant, True, DEVICE, torch.float32)
    plain_value, plain_grads = _loss_value_and_grads(variant, False, DEVICE, torch.float32)
    reference_value, reference_grads = _loss_value_and_grads(
        variant, False, torch.device("cpu"), torch.float64
    )
    assert torch.isfinite(fused_value) and fused_value > 0
    for value in (fused_value, plain_value):
        torch.testing.assert_close(value, reference_value, rtol=1e-5, atol=1e-9)
    for grads in (fused_grads, plain_grads):
        for got, want in zip(grads, reference_grads, strict=True):
            scale = want.abs().max().item()
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale)


def _maps_for_decoding() -> torch.Tensor:
    pred, _, _, _ = _heatmap_batch(6, 64, 48, seed=3, noise=0.02)
    maps = pred.clone()
    maps[0, 0] = 0.0  # no maximum > 0: coords (-1, -1)
    maps[0, 1] = -1.0
    maps[0, 2] = 0.25  # a flat map: every pixel ties, the first one wins
    maps[0, 3] = 0.0
    maps[0, 3, 10, 5] = maps[0, 3, 40, 30] = 0.9  # two equal peaks: the first in row-major order wins
    maps[0, 4] = 0.0
    maps[0, 4, 0, 47] = 1.0  # a peak on the border: no Taylor step
    return maps


@pytest.mark.parametrize("blur_kernel", [11, 3, 15])
def test_decode_dark_on_cuda_matches_the_cpu(blur_kernel):
    maps = _maps_for_decoding()
    cpu_coords, cpu_scores = decode_dark(maps, blur_kernel=blur_kernel)
    coords, scores = decode_dark(maps.to(DEVICE), blur_kernel=blur_kernel)
    assert coords.device.type == DEVICE.type and scores.device.type == DEVICE.type
    # The argmax and the maximum (torch.max on CUDA, NumPy on the CPU) are exact, ties included.
    torch.testing.assert_close(scores.cpu(), cpu_scores, rtol=0, atol=0)
    assert coords[0, 2].tolist() == [0.0, 0.0] and coords[0, 3].tolist() == [5.0, 10.0]
    assert coords[0, 0].tolist() == [-1.0, -1.0] and coords[0, 1].tolist() == [-1.0, -1.0]
    assert coords[0, 4].tolist() == [47.0, 0.0]
    torch.testing.assert_close(coords.cpu(), cpu_coords, rtol=0, atol=1e-4)
    # A half-precision input is decoded in float32 on the device as well.
    half_coords, _ = decode_dark(maps.to(DEVICE, torch.float16), blur_kernel=blur_kernel)
    assert half_coords.dtype == torch.float32
    half_cpu, _ = decode_dark(maps.half(), blur_kernel=blur_kernel)
    torch.testing.assert_close(half_coords.cpu(), half_cpu, rtol=0, atol=1e-4)


@pytest.mark.parametrize("mode", FLIP_MODES)
def test_flip_back_heatmaps_on_cuda_matches_the_cpu(mode):
    maps, _, _, _ = _heatmap_batch(3, 64, 48, seed=4)
    cpu = flip_back_heatmaps(maps, mode=mode)
    out = flip_back_heatmaps(maps.to(DEVICE), mode=mode)
    assert out.device.type == DEVICE.type and out.dtype == torch.float32 and out.shape == maps.shape
    # The exact mode is a float32 matrix product: it must not run in TF32 on the GPU.
    torch.testing.assert_close(out.cpu(), cpu, rtol=0, atol=1e-5)
    bf16 = flip_back_heatmaps(maps.to(DEVICE, torch.bfloat16), mode=mode)
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.float().cpu(), cpu, rtol=0, atol=2e-2)
    # The decoded flip test is the same on both devices.
    cpu_coords, _ = decode_dark(0.5 * (maps + cpu))
    coords, _ = decode_dark(0.5 * (maps.to(DEVICE) + out))
    torch.testing.assert_close(coords.cpu(), cpu_coords, rtol=0, atol=1e-3)


def _smoke_model_and_batch(seed: int = 0):
    torch.manual_seed(seed)
    model = build_pose_model("hrnet_w18_small", NUM_KEYPOINTS, with_kaf=True).to(DEVICE)
    images = torch.randn(4, 3, 128, 96, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    _, target, weight, _ = _heatmap_batch(4, 32, 24, seed=seed + 5)
    return model, images, target.to(DEVICE), weight.to(DEVICE)


def test_bf16_autocast_training_step_is_finite_and_kaf_stays_in_unit_interval():
    model, images, target, weight = _smoke_model_and_batch()
    model = model.to(memory_format=torch.channels_last)
    images = images.contiguous(memory_format=torch.channels_last)
    loss_fn = HeatmapLoss("fowkal")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        heatmaps, kaf = model(images)
        full_precision = loss_fn(heatmaps, target, weight, kaf=kaf).item()
    totals = []
    for _ in range(3):
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            heatmaps, kaf = model(images)
        assert heatmaps.dtype == torch.bfloat16  # autocast really ran the convolutions in bf16
        assert kaf is not None and kaf.shape == (4, NUM_KEYPOINTS)
        assert bool(((kaf >= 0) & (kaf <= 1)).all()), (kaf.min().item(), kaf.max().item())
        # As the training loop does: the loss in float32 on the bf16 outputs.
        total = loss_fn(heatmaps.float(), target, weight, kaf=kaf.float())
        assert torch.isfinite(total), total
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
        optimizer.step()
        totals.append(total.item())
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters(), strict=True))
    # bf16 convolutions change the first loss by a few per mille, not more.
    assert totals[0] == pytest.approx(full_precision, rel=2e-2), (totals, full_precision)


def test_channels_last_and_contiguous_give_the_same_loss():
    model, images, target, weight = _smoke_model_and_batch(seed=1)
    model.eval()  # running BN statistics: the two passes see the same normalisation
    loss_fn = HeatmapLoss("fowkal")
    with torch.no_grad():
        heatmaps, kaf = model(images)
        contiguous = loss_fn(heatmaps, target, weight, kaf=kaf)
        model = model.to(memory_format=torch.channels_last)
        last_heatmaps, last_kaf = model(images.contiguous(memory_format=torch.channels_last))
        channels_last = loss_fn(last_heatmaps, target, weight, kaf=last_kaf)
    assert torch.isfinite(contiguous)
    # cuDNN picks other kernels (and may use TF32) for the two layouts: equal to tolerance, not bitwise.
    torch.testing.assert_close(channels_last, contiguous, rtol=2e-3, atol=1e-6)
    torch.testing.assert_close(last_heatmaps, heatmaps, rtol=0, atol=2e-3 * heatmaps.abs().max().item())
    torch.testing.assert_close(last_kaf, kaf, rtol=0, atol=2e-3)
