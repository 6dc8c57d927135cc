"""CUDA paths: the fused loss, DARK decoding, flip-back, a bf16 autocast training step and channels-last;
for the KAPAO family its loss, decoding + NMS + fusion, and a bf16 step of KAPAO-S.

Marked ``gpu``; every test skips (saying why) where torch sees no CUDA device. ``FOWKAL_TEST_DEVICE=cpu``
runs the same bodies on the CPU instead (``bench/gpu_check.sh --dry-run`` does, so that the one GPU run
cannot fail on a typo); there the CUDA-vs-CPU comparisons are CPU-vs-CPU and prove nothing about CUDA.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.config import load_config
from trainer.datasets.keypoints import NUM_KEYPOINTS
from trainer.families import get_family
from trainer.kapao.anchors import P6_ANCHORS, STRIDES, outputs_per_anchor
from trainer.kapao.labels import label_rows, pose_and_keypoint_objects
from trainer.kapao.loss import KapaoLoss, KapaoLossConfig, _layer_loss, build_targets, scaled_gains
from trainer.kapao.postprocess import (
    KapaoEvalConfig,
    candidates,
    decode_outputs,
    non_max_suppression,
    poses_from_outputs,
)
from trainer.topdown.codec import FLIP_MODES, decode_dark, encode_unbiased, flip_back_heatmaps
from trainer.topdown.losses import LOSS_VARIANTS, HeatmapLoss
from trainer.topdown.model import build_pose_model

DEVICE = torch.device(os.environ.get("FOWKAL_TEST_DEVICE", "cuda"))

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEVICE.type == "cuda" and not torch.cuda.is_available(),
        reason="needs CUDA: torch sees no GPU here (FOWKAL_TEST_DEVICE=cpu runs the bodies on the CPU)",
    ),
]

VARIANTS = tuple(LOSS_VARIANTS)
KAPAO_SMOKE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smoke_kapao.yaml"


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


# ------------------------------------------------------------------------------------------------------ KAPAO


def _kapao_targets(batch: int, num_keypoints: int, input_size: int, people: int, seed: int) -> torch.Tensor:
    """Label rows as the KAPAO data set makes them (pose objects, then keypoint objects) of random people:
    boxes inside the input, keypoints inside their boxes, a third unlabelled."""
    rng = np.random.default_rng(seed)
    rows = []
    for image in range(batch):
        wh = rng.uniform(0.1, 0.6, (people, 2)) * input_size
        xy = rng.uniform(0.0, 1.0, (people, 2)) * (input_size - wh)
        keypoints = np.zeros((people, num_keypoints, 3), np.float32)
        keypoints[..., :2] = xy[:, None] + rng.uniform(0.0, 1.0, (people, num_keypoints, 2)) * wh[:, None]
        keypoints[..., 2] = rng.choice([0, 1, 2], (people, num_keypoints), p=[0.3, 0.2, 0.5])
        labels = pose_and_keypoint_objects(np.concatenate([xy, wh], 1), keypoints, (input_size, input_size))
        rows.append(
            label_rows(
                labels.boxes,
                labels.keypoints,
                labels.kp_classes,
                labels.kp_points,
                labels.kp_sides,
                image,
                input_size,
            )
        )
    return torch.cat(rows)


def _kapao_loss_float64(loss_fn: KapaoLoss, outputs: list[torch.Tensor], targets: torch.Tensor):
    """``KapaoLoss.forward``'s steps in float64 (the module itself always computes in float32)."""
    num_keypoints = (outputs[0].shape[-1] - 6) // 3
    input_size = max(outputs[0].shape[2], outputs[0].shape[3]) * loss_fn.strides[0]
    gains = scaled_gains(loss_fn.config, num_keypoints, input_size, len(loss_fn.strides))
    anchors_grid = [
        torch.tensor(a, dtype=torch.float64) / s
        for a, s in zip(loss_fn.anchors, loss_fn.strides, strict=True)
    ]
    grids = [(o.shape[2], o.shape[3]) for o in outputs]
    matched = build_targets(targets.double(), grids, anchors_grid, loss_fn.config.anchor_t)
    total = torch.zeros((), dtype=torch.float64)
    for out, layer_targets, weight in zip(outputs, matched, loss_fn.config.obj_layer_weights, strict=True):
        layer = _layer_loss(out, layer_targets, num_keypoints + 1, num_keypoints)
        total = total + gains["box"] * layer["box"] + gains["obj"] * weight * layer["obj"]
        total = total + gains["cls"] * layer["cls"] + gains["kps"] * layer["kps"]
    return total * outputs[0].shape[0]


def _kapao_outputs(batch: int, num_keypoints: int, input_size: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    channels = outputs_per_anchor(num_keypoints)
    shapes = [(batch, 3, input_size // s, input_size // s, channels) for s in STRIDES]
    return [1.5 * torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]


@pytest.mark.parametrize("num_keypoints", [17, 133])
def test_kapao_loss_on_cuda_matches_a_float64_cpu_reference(num_keypoints):
    reference_outputs = _kapao_outputs(2, num_keypoints, 256, seed=num_keypoints)
    reference_outputs = [o.requires_grad_() for o in reference_outputs]
    targets = _kapao_targets(2, num_keypoints, 256, people=3, seed=num_keypoints)
    loss_fn = KapaoLoss(KapaoLossConfig())
    reference = _kapao_loss_float64(loss_fn, reference_outputs, targets)
    reference_grads = torch.autograd.grad(reference, reference_outputs)
    # The reference is KapaoLoss's arithmetic: on the CPU in float32 the module agrees with it.
    cpu_total, _ = loss_fn([o.detach().float() for o in reference_outputs], targets)
    torch.testing.assert_close(cpu_total.double(), reference.detach(), rtol=1e-5, atol=0)

    outputs = [o.detach().to(DEVICE, torch.float32).requires_grad_() for o in reference_outputs]
    total, parts = loss_fn(outputs, targets.to(DEVICE))
    assert total.device.type == DEVICE.type and total.dtype == torch.float32
    assert all(bool(torch.isfinite(p)) and p > 0 for p in parts.values()), parts  # every term has positives
    torch.testing.assert_close(total.detach().double().cpu(), reference.detach(), rtol=1e-5, atol=0)
    grads = torch.autograd.grad(total, outputs)
    for got, want in zip(grads, reference_grads, strict=True):
        scale = want.abs().max().item()
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-4, atol=1e-5 * scale)
    # bf16 head outputs (as under autocast) are computed in float32 too.
    bf16_total, _ = loss_fn([o.detach().bfloat16() for o in outputs], targets.to(DEVICE))
    assert bf16_total.dtype == torch.float32
    torch.testing.assert_close(bf16_total.double().cpu(), reference.detach(), rtol=2e-2, atol=0)


def _logit(p: float) -> float:
    return float(np.log(p / (1.0 - p)))


def _crowd_outputs(num_keypoints: int, input_size: int, people: int, seed: int) -> list[torch.Tensor]:
    """Raw head outputs of a crowd: per person a best pose anchor (0.6-0.95) among ~20 weaker duplicates at
    stride 16, and one or two keypoint objects per keypoint type near that pose's keypoint at stride 8; every
    other anchor is empty. Distinct random scores: no ties for NMS or fusion to break differently."""
    rng = np.random.default_rng(seed)
    k = num_keypoints
    outputs = [torch.zeros(1, 3, input_size // s, input_size // s, outputs_per_anchor(k)) for s in STRIDES]
    for out in outputs:
        out[..., :4] = torch.from_numpy(rng.normal(0.0, 0.5, out.shape[:4] + (4,))).float()
        out[..., 4] = -20.0  # objectness ~2e-9: below every floor
        out[..., 5 : 5 + k + 1] = -8.0
        out[..., 5 + k + 1 :] = torch.from_numpy(rng.normal(0.0, 0.5, out.shape[:4] + (2 * k,))).float()

    def put(level: int, anchor: int, gy: int, gx: int, cls: int, conf: float) -> torch.Tensor:
        cells = outputs[level].shape[2]
        row = outputs[level][0, anchor, int(np.clip(gy, 0, cells - 1)), int(np.clip(gx, 0, cells - 1))]
        row[4] = row[5 + cls] = _logit(np.sqrt(conf))
        return row

    cells = input_size // STRIDES[1]
    for _ in range(people):
        cy, cx = rng.integers(1, cells - 1, 2)
        for _ in range(20):
            dy, dx = rng.integers(-1, 2, 2)
            put(1, int(rng.integers(0, 3)), cy + dy, cx + dx, 0, rng.uniform(0.01, 0.5) ** 2)
        anchor = int(rng.integers(0, 3))
        row = put(1, anchor, cy, cx, 0, rng.uniform(0.6, 0.95))
        offsets = (4 * torch.sigmoid(row[5 + k + 1 :].double()).reshape(k, 2) - 2).numpy()
        keypoints = offsets * np.asarray(P6_ANCHORS[1][anchor]) + np.array([cx, cy]) * STRIDES[1]
        for kp in range(k):
            for _ in range(int(rng.integers(1, 3))):
                x, y = (keypoints[kp] + rng.normal(0.0, 4.0, 2)) / STRIDES[0]
                put(0, int(rng.integers(0, 3)), int(y), int(x), kp + 1, rng.uniform(0.25, 0.95))
    return outputs


@pytest.mark.parametrize("num_keypoints", [17, 133])
def test_kapao_decode_nms_and_fusion_on_cuda_match_the_cpu(num_keypoints):
    cpu_outputs = [
        torch.cat([a, b])
        for a, b in zip(
            _crowd_outputs(num_keypoints, 256, people=4, seed=1),
            _crowd_outputs(num_keypoints, 256, people=6, seed=2),
            strict=True,
        )
    ]
    outputs = [o.to(DEVICE) for o in cpu_outputs]
    decoded = decode_outputs(outputs)
    assert decoded.device.type == DEVICE.type
    torch.testing.assert_close(decoded.cpu(), decode_outputs(cpu_outputs), rtol=1e-5, atol=1e-4)

    settings = KapaoEvalConfig()
    for got, want in zip(
        candidates(outputs, settings.tau_cp, settings.tau_ck),
        candidates(cpu_outputs, settings.tau_cp, settings.tau_ck),
        strict=True,
    ):
        # The same candidates in the same order (layer, anchor, row, column) ...
        assert len(want.pose_scores) > 0 and len(want.kp_scores) > 0
        assert torch.equal(got.kp_classes.cpu(), want.kp_classes)
        for name in ("pose_boxes", "pose_scores", "pose_keypoints", "kp_boxes", "kp_scores"):
            torch.testing.assert_close(getattr(got, name).cpu(), getattr(want, name), rtol=1e-5, atol=1e-4)
        # ... and the same NMS survivors.
        kept, kept_cpu = non_max_suppression(got, settings), non_max_suppression(want, settings)
        assert len(kept.pose_scores) == len(kept_cpu.pose_scores) < len(want.pose_scores)
        assert torch.equal(kept.kp_classes.cpu(), kept_cpu.kp_classes)
        for name in ("pose_boxes", "pose_scores", "kp_boxes", "kp_scores"):
            got_kept, want_kept = getattr(kept, name).cpu(), getattr(kept_cpu, name)
            torch.testing.assert_close(got_kept, want_kept, rtol=1e-5, atol=1e-4)

    letterboxes = [(0.5, (0.0, 32.0)), (1.0, (0.0, 0.0))]
    poses = poses_from_outputs(outputs, settings, letterboxes)
    poses_cpu = poses_from_outputs(cpu_outputs, settings, letterboxes)
    fused = 0
    for (keypoints, scores), (keypoints_cpu, scores_cpu) in zip(poses, poses_cpu, strict=True):
        assert keypoints.device.type == DEVICE.type and keypoints.shape == keypoints_cpu.shape
        torch.testing.assert_close(scores.cpu(), scores_cpu, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(keypoints.cpu(), keypoints_cpu, rtol=1e-5, atol=1e-3)
        fused += int((keypoints_cpu[..., 2] != scores_cpu[:, None]).sum())
    assert fused > 0  # keypoint objects were fused in: the comparison covers the fusion rule


def test_kapao_s_bf16_autocast_training_step_is_finite_with_channels_last():
    cfg = load_config(KAPAO_SMOKE_CONFIG, ["data.input_size=128", "batch_size=2"])
    family = get_family(cfg.family)
    torch.manual_seed(0)
    model = family.build_model(cfg, pretrained=False).to(DEVICE).to(memory_format=torch.channels_last)
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.weight.is_contiguous(memory_format=torch.channels_last)
    training = family.training(cfg, model, DEVICE)
    optimizer, scheduler, _ = family.build_optimizer(cfg, model, iters_per_epoch=4)
    generator = torch.Generator().manual_seed(0)
    batch = {
        "images": torch.randint(0, 256, (2, 3, 128, 128), dtype=torch.uint8, generator=generator),
        "targets": _kapao_targets(2, 133, 128, people=2, seed=0),
    }
    head_dtypes = []
    hook = model.register_forward_hook(lambda module, inputs, out: head_dtypes.extend(o.dtype for o in out))
    with torch.no_grad():
        full_precision, _ = training.step(model, batch, DEVICE, None, channels_last=True)
    before = [p.detach().clone() for p in model.parameters()]
    model.train()
    total, parts = training.step(model, batch, DEVICE, torch.bfloat16, channels_last=True)
    hook.remove()
    assert head_dtypes[-1] == torch.bfloat16  # autocast really ran the network in bf16
    assert set(parts) == set(training.loss_parts)
    assert torch.isfinite(total) and all(bool(torch.isfinite(p)) for p in parts.values()), (total, parts)
    # The loss is computed in float32 on the bf16 head: within a few per cent of the float32 forward's.
    assert total.item() == pytest.approx(full_precision.item(), rel=5e-2)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) == len(before) and all(bool(torch.isfinite(g).all()) for g in grads)
    assert any(bool(g.abs().sum() > 0) for g in grads)
    optimizer.step()
    scheduler.step()
    training.after_optimizer_step(model)  # the EMA, as the loop does after each optimiser step
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters(), strict=True))
    ema = training.eval_model(model)
    assert all(bool(torch.isfinite(v).all()) for v in ema.state_dict().values() if v.is_floating_point())
