"""The fused pixel pass of ``trainer.topdown.losses.HeatmapLoss``: each keypoint's pixel mean of (weighted)
AWing and
MSE (Eq. 2, 9) and its analytic derivative in one sweep over cache-sized slabs, with no autograd graph over
the ``B*K*H*W`` elements and no full-size temporaries. ``HeatmapLoss(..., fused=False)`` runs the same
equations through the element-wise functions of ``trainer.topdown.losses`` and autograd; the tests check both
agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from trainer.topdown.losses import LossConfig


# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PixelLossConfig:
    """Static settings of the per-pixel work: loss settings (Eq. 2, 9), the weighting, the slab size."""

    settings: LossConfig
    weighting: str = "none"
    chunk_elements: int = 1 << 18
    # Far AWing branch on the selected pixels only (None: on CPU; GPUs compute both branches, no sync).
    sparse_far_branch: bool | None = None


def _slabs(batch: int, keypoints: int, pixels: int, runs: tuple[tuple[int, int], ...], chunk: int):
    """Yield (b0, b1, k0, k1) blocks of about ``chunk`` elements that never straddle two keypoint runs."""
    per_keypoint = batch * pixels
    if chunk >= per_keypoint:
        step_k, step_b = max(1, chunk // per_keypoint), batch
    else:
        step_k, step_b = 1, max(1, chunk // pixels)
    for start, stop in runs:
        for k0 in range(start, stop, step_k):
            k1 = min(stop, k0 + step_k)
            for b0 in range(0, batch, step_b):
                yield b0, min(batch, b0 + step_b), k0, k1


def _pixel_weight(pred: Tensor, target: Tensor, cfg: PixelLossConfig, want_grad: bool):
    """WAHR / FWAHR weight and, when ``want_grad``, its derivative w.r.t. pred (abs' (0) = 0, as autograd)."""
    hp = cfg.settings
    target_pow = target.pow(hp.gamma)
    abs_pred = pred.abs()
    one_minus = torch.rsub(pred, 1.0)
    # p^g |1-x| + |x| (1-p^g) = p^g (|1-x| - |x|) + |x|
    weight = one_minus.abs().sub_(abs_pred).mul_(target_pow).add_(abs_pred)
    dweight = None
    if want_grad:
        sign_pred = pred.sign()
        # d/dx = -p^g sign(1-x) + sign(x) (1 - p^g) = sign(x) - p^g (sign(1-x) + sign(x))
        dweight = one_minus.sign_().add_(sign_pred).mul_(target_pow).neg_().add_(sign_pred)
    if cfg.weighting == "fwahr":  # Eq. 9
        gate = (pred if hp.fwahr_condition == "pred" else target) >= 2.0 ** (-1.0 / hp.gamma)
        weight = torch.where(gate, weight, target * hp.tau)
        if dweight is not None:
            dweight.mul_(gate)
    return weight, dweight


def _awing_and_slope(diff: Tensor, abs_diff: Tensor, target: Tensor, cfg: PixelLossConfig, want_grad: bool):
    """AWing (Eq. 2) of ``diff = p_hat - p`` and, when ``want_grad``, its derivative w.r.t. p_hat."""
    hp = cfg.settings
    exponent = torch.rsub(target, hp.alpha)  # alpha - p
    base = abs_diff if hp.epsilon == 1.0 else abs_diff / hp.epsilon
    base_pow = torch.pow(base, exponent)  # |d/eps|^(alpha-p)
    near = torch.log1p(base_pow).mul_(hp.omega)
    is_far = abs_diff >= hp.theta
    # On CPU the far branch (|d| >= theta, few pixels once training is under way) is computed on those
    # pixels only; on GPUs that selection would cost a device sync, so both branches are computed.
    sparse = cfg.sparse_far_branch
    if sparse is None:
        sparse = abs_diff.device.type == "cpu"
    if sparse:
        far_exponent, far_abs = exponent[is_far], abs_diff[is_far]
    else:
        far_exponent, far_abs = exponent, abs_diff
    ratio_pow = far_exponent.mul(math.log(hp.theta / hp.epsilon)).exp_()  # t = (theta/eps)^e, e = alpha - p
    # A = omega e (theta/eps)^(e-1) / (eps (1 + t)) = omega e t / (theta (1 + t))
    slope = ratio_pow.mul(far_exponent).div_(ratio_pow + 1.0).mul_(hp.omega / hp.theta)
    # A |d| - C with C = theta A - omega ln(1 + t)  ==  A (|d| - theta) + omega ln(1 + t)
    far = far_abs.sub(hp.theta).mul_(slope).add_(torch.log1p(ratio_pow).mul_(hp.omega))
    value = near.masked_scatter_(is_far, far) if sparse else torch.where(is_far, far, near)
    if not want_grad:
        return value, None
    # near: omega e |d/eps|^(e-1) / (eps (1 + |d/eps|^e)) sign(d) = omega e base_pow / ((1 + base_pow) d);
    # 0/0 at d = 0 where the true slope is 0 (e > 1).
    near_slope = base_pow.mul(exponent).div_(diff).div_(base_pow.add_(1.0)).mul_(hp.omega).nan_to_num_(0.0)
    if sparse:
        return value, near_slope.masked_scatter_(is_far, slope.mul_(diff[is_far].sign()))
    return value, torch.where(is_far, slope.mul_(diff.sign()), near_slope)


class _FusedKeypointTerms(torch.autograd.Function):
    """``term[b,k] = awing_coef * mean_px(W * AWing) + mse_coef * mean_px(W * MSE)``, analytic backward.

    The forward computes, slab by slab, the per-pixel loss and its derivative w.r.t. pred and stores the
    combined pixel gradient ``dterm[b,k]/dpred`` (one tensor the size of pred); the backward only scales it
    by the incoming ``[B, K]`` gradient. Gradients flow to pred and to both coefficients, not to target.
    A coefficient may be None (that loss is not needed); slabs whose coefficients are all 0 and need no
    gradient are skipped on CPU (a zero target weight), where that check costs no device sync.
    """

    @staticmethod
    def forward(ctx, pred, target, awing_coef, mse_coef, cfg, runs):  # noqa: D102
        batch, keypoints, height, width = pred.shape
        pixels = height * width
        want_grad = ctx.needs_input_grad[0]
        want_dweight = want_grad and cfg.weighting != "none" and not cfg.settings.detach_weight
        on_cpu = pred.device.type == "cpu"
        pixel_grad = torch.zeros_like(pred) if want_grad else None
        awing_mean = pred.new_zeros(batch, keypoints) if awing_coef is not None else None
        mse_mean = pred.new_zeros(batch, keypoints) if mse_coef is not None else None

        def needed(coef: Tensor | None, b0: int, b1: int, k0: int, k1: int) -> bool:
            if coef is None:
                return False
            if not on_cpu or coef.requires_grad:
                return True
            return bool(coef[b0:b1, k0:k1].any())

        for b0, b1, k0, k1 in _slabs(batch, keypoints, pixels, runs, cfg.chunk_elements):
            use_awing = needed(awing_coef, b0, b1, k0, k1)
            use_mse = needed(mse_coef, b0, b1, k0, k1)
            if not (use_awing or use_mse):
                continue
            x = pred[b0:b1, k0:k1]
            p = target[b0:b1, k0:k1]
            diff = x - p
            weight = dweight = None
            if cfg.weighting != "none":
                weight, dweight = _pixel_weight(x, p, cfg, want_dweight)
            grad_out = pixel_grad[b0:b1, k0:k1] if want_grad else None
            for use, kind, coef, means in (
                (use_awing, "awing", awing_coef, awing_mean),
                (use_mse, "mse", mse_coef, mse_mean),
            ):
                if not use:
                    continue
                if kind == "awing":
                    loss, dloss = _awing_and_slope(diff, diff.abs(), p, cfg, want_grad)
                else:
                    loss, dloss = diff.square(), (diff * 2.0 if want_grad else None)
                if weight is not None:
                    if dloss is not None:
                        dloss.mul_(weight)
                        if dweight is not None:
                            dloss.addcmul_(loss, dweight)
                    loss = loss.mul_(weight)
                means[b0:b1, k0:k1] = loss.sum(dim=(2, 3)) / pixels
                if want_grad:
                    grad_out.addcmul_(dloss, coef[b0:b1, k0:k1, None, None].detach(), value=1.0 / pixels)

        terms = pred.new_zeros(batch, keypoints)
        if awing_coef is not None:
            terms = terms + awing_coef.detach() * awing_mean
        if mse_coef is not None:
            terms = terms + mse_coef.detach() * mse_mean
        ctx.save_for_backward(pixel_grad, awing_mean, mse_mean)
        return terms

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_terms):  # noqa: D102
        pixel_grad, awing_mean, mse_mean = ctx.saved_tensors
        grad_pred = grad_awing = grad_mse = None
        if ctx.needs_input_grad[0]:
            grad_pred = pixel_grad * grad_terms[:, :, None, None]
        if ctx.needs_input_grad[2]:
            grad_awing = grad_terms * awing_mean
        if ctx.needs_input_grad[3]:
            grad_mse = grad_terms * mse_mean
        return grad_pred, None, grad_awing, grad_mse, None, None
