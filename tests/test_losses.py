"""Tests of trainer/topdown/losses.py against hand computations and an independent NumPy implementation."""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
import torch

from trainer.datasets.keypoints import COCO_WHOLEBODY_PARTS
from trainer.topdown.losses import LOSS_VARIANTS, HeatmapLoss, awing, fwahr_weight, wahr_weight

VARIANTS = ("mse", "awing", "heuristic", "kal", "heuristic_wahr", "heuristic_fwahr", "kal_wahr", "fowkal")
KAL_VARIANTS = ("kal", "kal_wahr", "fowkal")
SMALL_PARTS = {"body": (0, 1, 2), "foot": (3,), "face": (4, 5), "hand": (6, 7)}

# ------------------------------------------------------------------------------------------------------------
# Independent NumPy reference (written from the paper and the issue, not from the module)
# ------------------------------------------------------------------------------------------------------------


def np_awing(pred, target, omega=14.0, theta=0.5, epsilon=1.0, alpha=2.1):
    out = np.empty(np.broadcast(pred, target).shape)
    for i, (ph, p) in enumerate(np.broadcast(pred, target)):
        delta = abs(p - ph)
        e = alpha - p
        if delta < theta:
            out.flat[i] = omega * math.log(1 + (delta / epsilon) ** e)
        else:
            a = omega * (1 / (1 + (theta / epsilon) ** e)) * e * (theta / epsilon) ** (e - 1) / epsilon
            c = theta * a - omega * math.log(1 + (theta / epsilon) ** e)
            out.flat[i] = a * delta - c
    return out


def np_wahr(pred, target, gamma=0.01):
    return target**gamma * np.abs(1 - pred) + np.abs(pred) * (1 - target**gamma)


def np_fwahr(pred, target, gamma=0.01, tau=0.01, condition="pred"):
    gate = pred if condition == "pred" else target
    return np.where(gate >= 2 ** (-1 / gamma), np_wahr(pred, target, gamma), tau * target)


def np_total(variant, pred, target, tw, kaf=None, parts=COCO_WHOLEBODY_PARTS, reg_weight=1.0, **kw):
    """The issue's reductions, sample by sample, keypoint by keypoint."""
    condition = kw.pop("fwahr_condition", "pred")
    kaf_mode = kw.pop("kaf_mode", "literal")
    prior_weight = kw.pop("kaf_prior_weight", 0.5)
    gamma, tau = kw.pop("gamma", 0.01), kw.pop("tau", 0.01)
    aw_kw = kw
    weighting = variant.split("_")[-1] if variant.endswith(("_wahr", "_fwahr")) or variant == "fowkal" else ""
    if variant == "fowkal":
        weighting = "fwahr"
    b, k = tw.shape

    def pixel_mean(loss, x, p):
        if weighting == "wahr":
            loss = np_wahr(x, p, gamma) * loss
        elif weighting == "fwahr":
            loss = np_fwahr(x, p, gamma, tau, condition) * loss
        return loss.mean()

    totals = []
    for i in range(b):
        mse = np.array(
            [pixel_mean((pred[i, j] - target[i, j]) ** 2, pred[i, j], target[i, j]) for j in range(k)]
        )
        aw = np.array(
            [
                pixel_mean(np_awing(pred[i, j], target[i, j], **aw_kw), pred[i, j], target[i, j])
                for j in range(k)
            ]
        )
        if variant in ("mse", "awing"):
            terms = (mse if variant == "mse" else aw) * tw[i]
            totals.append(terms.mean())
        elif variant.startswith("heuristic"):
            bf = list(parts["body"]) + list(parts["foot"])
            fh = list(parts["face"]) + list(parts["hand"])
            n = len(bf) + len(fh)
            l_bf = sum(mse[j] * tw[i, j] for j in bf) / len(bf)
            l_fh = sum(aw[j] * tw[i, j] for j in fh) / len(fh)
            # Eq. 5: lambda_fh * L_bf + lambda_bf * L_fh
            totals.append(len(fh) / n * l_bf + len(bf) / n * l_fh)
        else:
            lam = kaf[i]
            total = 0.0
            for idx in parts.values():
                idx = list(idx)
                adaptive = [tw[i, j] * (lam[j] * aw[j] + (1 - lam[j]) * mse[j]) for j in idx]
                total += np.mean(adaptive) + reg_weight * np.var(lam[idx])
                if kaf_mode == "uncertainty":
                    total += np.mean([-prior_weight * (math.log(lam[j]) + math.log(1 - lam[j])) for j in idx])
            totals.append(total)
    return float(np.mean(totals))


def random_inputs(b, k, h, w, seed=0, dtype=torch.float64, kink_free=False):
    """Heatmap-like inputs; with kink_free, stay away from |x|=0, |1-x|=0, |x-p|=theta and x=p."""
    gen = np.random.default_rng(seed)
    target = gen.uniform(0, 1, (b, k, h, w)) * (gen.uniform(0, 1, (b, k, h, w)) > 0.4)
    pred = gen.uniform(-0.4, 1.3, (b, k, h, w))
    if kink_free:
        for _ in range(100):
            bad = (
                (np.abs(pred) < 0.03)
                | (np.abs(1 - pred) < 0.03)
                | (np.abs(np.abs(pred - target) - 0.5) < 0.03)
                | (np.abs(pred - target) < 0.03)
            )
            if not bad.any():
                break
            pred[bad] = gen.uniform(-0.4, 1.3, bad.sum())
    tw = (gen.uniform(0, 1, (b, k)) > 0.25).astype(float)
    kaf = gen.uniform(0.05, 0.95, (b, k))
    to = lambda a: torch.tensor(a, dtype=dtype)  # noqa: E731
    return to(pred), to(target), to(tw), to(kaf)


# ------------------------------------------------------------------------------------------------------------
# Element-wise functions
# ------------------------------------------------------------------------------------------------------------


def test_awing_value_for_ones_against_zeros():
    # |p - p_hat| = 1 >= theta: A*1 - C with p = 0, by hand: A = 14/(1+0.5^2.1) * 2.1 * 0.5^1.1
    a = 14 / (1 + 0.5**2.1) * 2.1 * 0.5**1.1
    c = 0.5 * a - 14 * math.log(1 + 0.5**2.1)
    assert a - c == pytest.approx(8.4959, abs=1e-4)
    value = awing(torch.ones(2, 3), torch.zeros(2, 3)).mean()
    assert value.item() == pytest.approx(8.4959, abs=1e-4)


def test_awing_matches_numpy_reference():
    pred, target, _, _ = random_inputs(1, 3, 5, 4, seed=1)
    got = awing(pred, target, omega=10.0, theta=0.4, epsilon=1.5, alpha=2.3).numpy()
    want = np_awing(pred.numpy(), target.numpy(), omega=10.0, theta=0.4, epsilon=1.5, alpha=2.3)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("p", [0.0, 0.3, 0.8, 1.0])
def test_awing_continuous_value_and_slope_at_theta(p):
    theta, delta = 0.5, 1e-7
    target = torch.full((2,), p, dtype=torch.float64)
    pred = torch.tensor([p + theta - delta, p + theta + delta], dtype=torch.float64, requires_grad=True)
    value = awing(pred, target, theta=theta)
    assert abs(value[1].item() - value[0].item()) < 1e-5
    (grad,) = torch.autograd.grad(value.sum(), pred)
    slope_a = 14 / (1 + theta ** (2.1 - p)) * (2.1 - p) * theta ** (1.1 - p)  # A of Eq. 2 by hand
    assert grad[1].item() == pytest.approx(slope_a, rel=1e-9)
    assert grad[0].item() == pytest.approx(slope_a, rel=1e-5)


@pytest.mark.parametrize("p", [0.0, 0.25, 1.0])
def test_awing_zero_and_flat_where_prediction_is_exact(p):
    target = torch.full((3,), p, dtype=torch.float64)
    pred = target.clone().requires_grad_()
    value = awing(pred, target)
    assert torch.all(value == 0)
    (grad,) = torch.autograd.grad(value.sum(), pred)
    assert torch.all(grad == 0)


def test_wahr_weight_by_hand():
    pred = torch.tensor([0.3, -0.2, 1.5])
    target = torch.tensor([0.5, 0.0, 1.0])
    g = 0.5**0.01
    want = [g * 0.7 + 0.3 * (1 - g), 0.2, 0.5]  # p=0: |p_hat|; p=1: |1 - p_hat|
    np.testing.assert_allclose(wahr_weight(pred, target).numpy(), want, rtol=1e-6)


def test_fwahr_both_branches_gate_on_pred():
    pred = torch.tensor([0.3, -0.2, 0.0, 1e-35])
    target = torch.tensor([0.5, 0.4, 0.6, 0.2])
    got = fwahr_weight(pred, target, tau=0.05).numpy()
    g = 0.5**0.01
    # 0.3 >= 2^-100: WAHR; -0.2, 0.0 and 1e-35 < 2^-100 ~ 7.9e-31: tau * p
    want = [g * 0.7 + 0.3 * (1 - g), 0.05 * 0.4, 0.05 * 0.6, 0.05 * 0.2]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_fwahr_both_branches_gate_on_target():
    pred = torch.tensor([-0.2, 0.3, 0.3], dtype=torch.float64)
    target = torch.tensor([0.4, 0.0, 1e-35], dtype=torch.float64)
    got = fwahr_weight(pred, target, gamma=0.01, tau=0.05, condition="target").numpy()
    want = [0.4**0.01 * 1.2 + 0.2 * (1 - 0.4**0.01), 0.0, 0.05 * 1e-35]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_allclose(got, np_fwahr(pred.numpy(), target.numpy(), 0.01, 0.05, "target"))


def test_elementwise_gradcheck_float64():
    pred, target, _, _ = random_inputs(1, 2, 3, 3, seed=2, kink_free=True)
    pred.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: awing(x, target), (pred,))
    assert torch.autograd.gradcheck(lambda x: wahr_weight(x, target), (pred,))
    assert torch.autograd.gradcheck(lambda x: fwahr_weight(x, target), (pred,))


# ------------------------------------------------------------------------------------------------------------
# HeatmapLoss totals
# ------------------------------------------------------------------------------------------------------------


def test_variant_table_names_match_the_paper():
    assert set(LOSS_VARIANTS) == set(VARIANTS)
    for name in VARIANTS:
        assert HeatmapLoss(name).needs_kaf == (name in KAL_VARIANTS)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("variant", VARIANTS)
def test_total_matches_numpy_on_wholebody_layout(variant, fused):
    pred, target, tw, kaf = random_inputs(2, 133, 3, 2, seed=3)
    kaf_t = kaf if variant in KAL_VARIANTS else None
    loss = HeatmapLoss(variant, fused=fused, chunk_elements=40)
    got = loss(pred, target, tw, kaf_t).item()
    want = np_total(variant, pred.numpy(), target.numpy(), tw.numpy(), kaf.numpy())
    assert got == pytest.approx(want, rel=1e-10, abs=1e-12)


_OPTION_SETS = [
    {"fwahr_condition": "target"},
    {"kaf_mode": "uncertainty"},
    {"kaf_mode": "uncertainty", "kaf_prior_weight": 0.1, "reg_weight": 3.0},
    {"reg_weight": 0.0, "gamma": 0.2, "tau": 0.3},
    {"omega": 9.0, "theta": 0.3, "epsilon": 2.0, "alpha": 2.5},
]


@pytest.mark.parametrize(
    ("variant", "options"),
    [
        (variant, options)
        for variant in ("fowkal", "kal_wahr", "heuristic_fwahr")
        for options in _OPTION_SETS
        # kaf_mode only concerns the KAL family.
        if "kaf_mode" not in options or variant in KAL_VARIANTS
    ],
)
def test_total_matches_numpy_with_options(variant, options):
    pred, target, tw, kaf = random_inputs(3, 8, 4, 3, seed=4)
    kaf_t = kaf if variant in KAL_VARIANTS else None
    for fused in (True, False):
        loss = HeatmapLoss(variant, parts=SMALL_PARTS, fused=fused, chunk_elements=7, **options)
        got = loss(pred, target, tw, kaf_t).item()
        want = np_total(
            variant, pred.numpy(), target.numpy(), tw.numpy(), kaf.numpy(), SMALL_PARTS, **options
        )
        assert got == pytest.approx(want, rel=1e-10, abs=1e-12), fused


def test_heuristic_by_hand_on_constant_maps():
    # 1x1 maps, 3 body/foot and 4 face/hand keypoints: MSE on body/foot, AWing on face/hand, Eq. 5 factors.
    parts = {"body": (0, 1), "foot": (2,), "face": (3, 4, 5), "hand": (6,)}
    pred = torch.tensor([0.2, 0.4, 0.1, 1.0, 0.0, 0.0, 1.0]).view(1, 7, 1, 1)
    target = torch.zeros(1, 7, 1, 1)
    tw = torch.ones(1, 7)
    got = HeatmapLoss("heuristic", parts=parts)(pred, target, tw).item()
    l_bf = (0.04 + 0.16 + 0.01) / 3
    l_fh = (8.4959 + 0 + 0 + 8.4959) / 4
    assert got == pytest.approx(4 / 7 * l_bf + 3 / 7 * l_fh, rel=1e-4)


# ------------------------------------------------------------------------------------------------------------
# Gradients: gradcheck of the fused pass, and fused == autograd formulation
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variant", "condition"),
    [(variant, "pred") for variant in VARIANTS]
    # fwahr_condition only concerns the FWAHR variants.
    + [(variant, "target") for variant in VARIANTS if variant.endswith("fwahr") or variant == "fowkal"],
)
def test_fused_gradcheck_float64(variant, condition):
    pred, target, tw, kaf = random_inputs(2, 8, 3, 2, seed=5, kink_free=True)
    loss = HeatmapLoss(variant, parts=SMALL_PARTS, fwahr_condition=condition, chunk_elements=5)
    pred.requires_grad_()
    if variant in KAL_VARIANTS:
        kaf.requires_grad_()
        assert torch.autograd.gradcheck(lambda x, lam: loss(x, target, tw, lam), (pred, kaf))
    else:
        assert torch.autograd.gradcheck(lambda x: loss(x, target, tw), (pred,))


@pytest.mark.parametrize("detach_weight", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_and_autograd_formulation_agree(variant, detach_weight):
    pred, target, tw, kaf = random_inputs(2, 133, 4, 3, seed=6)
    pred[0, 5, 0, 0] = target[0, 5, 0, 0]  # an exact prediction (0/0 in the fused AWing slope)
    needs = variant in KAL_VARIANTS
    results = []
    for fused in (True, False):
        x = pred.clone().requires_grad_()
        lam = kaf.clone().requires_grad_() if needs else None
        loss = HeatmapLoss(variant, fused=fused, detach_weight=detach_weight, epsilon=1.3, chunk_elements=100)
        total = loss(x, target, tw, lam)
        grads = torch.autograd.grad(total, [x, lam] if needs else [x])
        results.append((total, grads))
    (t1, g1), (t2, g2) = results
    torch.testing.assert_close(t1, t2, rtol=1e-12, atol=1e-12)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gpu_code_path_agrees_on_cpu():
    # The dense AWing branch selection (used on GPUs, no device sync) gives the same values and gradients.
    pred, target, tw, kaf = random_inputs(2, 8, 4, 3, seed=13)
    results = []
    for sparse in (True, False):
        x = pred.clone().requires_grad_()
        loss = HeatmapLoss("fowkal", parts=SMALL_PARTS, chunk_elements=10)
        loss.pixel_config = dataclasses.replace(loss.pixel_config, sparse_far_branch=sparse)
        total = loss(x, target, tw, kaf)
        results.append((total, torch.autograd.grad(total, x)[0]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=1e-14)


def test_fused_float32_close_to_float64_reference():
    pred, target, tw, kaf = random_inputs(2, 133, 8, 6, seed=7)
    want = HeatmapLoss("fowkal", fused=False)(pred, target, tw, kaf).item()
    got = HeatmapLoss("fowkal")(pred.float(), target.float(), tw.float(), kaf.float()).item()
    assert got == pytest.approx(want, rel=1e-5)


def test_detach_weight_changes_only_the_gradient():
    pred, target, tw, _ = random_inputs(1, 8, 3, 3, seed=8, kink_free=True)
    grads, totals = [], []
    for detach in (False, True):
        x = pred.clone().requires_grad_()
        total = HeatmapLoss("heuristic_wahr", parts=SMALL_PARTS, detach_weight=detach)(x, target, tw)
        totals.append(total.item())
        grads.append(torch.autograd.grad(total, x)[0])
    assert totals[0] == pytest.approx(totals[1], rel=1e-14)
    assert not torch.allclose(grads[0], grads[1])
    # Detached: d/dx of W * (x - p)^2 with W constant, pixel mean, Eq. 5 factor for a body keypoint.
    w = np_wahr(pred.numpy(), target.numpy())
    body_factor = (4 / 8) / 4  # lambda_fh / N_bf with N_bf = 4, N_fh = 4
    want = body_factor * tw.numpy()[0, 0] * w[0, 0] * 2 * (pred - target).numpy()[0, 0] / 9
    np.testing.assert_allclose(grads[1][0, 0].numpy(), want, rtol=1e-10)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_target_weight_silences_a_keypoint(variant, fused):
    pred, target, tw, kaf = random_inputs(2, 8, 3, 3, seed=9)
    tw[:, 2] = 0.0
    tw[1, 5] = 0.0
    kaf_t = kaf if variant in KAL_VARIANTS else None
    loss = HeatmapLoss(variant, parts=SMALL_PARTS, fused=fused, chunk_elements=9)
    x = pred.clone().requires_grad_()
    total = loss(x, target, tw, kaf_t)
    (grad,) = torch.autograd.grad(total, x)
    assert torch.all(grad[:, 2] == 0) and torch.all(grad[1, 5] == 0)
    assert grad[0, 5].abs().sum() > 0
    changed = pred.clone()
    changed[:, 2] = 5.0
    changed[1, 5] = -3.0
    assert loss(changed, target, tw, kaf_t).item() == pytest.approx(total.item(), rel=1e-14)


# ------------------------------------------------------------------------------------------------------------
# Parts for logging, KAF modes
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_parts_add_up_to_the_total(variant):
    pred, target, tw, kaf = random_inputs(2, 133, 3, 2, seed=10)
    kaf_t = kaf if variant in KAL_VARIANTS else None
    total, parts = HeatmapLoss(variant)(pred, target, tw, kaf_t, return_parts=True)
    expected_keys = {"body", "foot", "face", "hand"} | ({"reg"} if variant in KAL_VARIANTS else set())
    assert set(parts) == expected_keys
    assert all(v.dim() == 0 and not v.requires_grad for v in parts.values())
    if variant in ("mse", "awing"):  # part means, weighted by part size
        sizes = {name: len(idx) for name, idx in COCO_WHOLEBODY_PARTS.items()}
        recombined = sum(sizes[name] / 133 * parts[name] for name in sizes)
        body_mean = np_total(variant, pred.numpy()[:, :17], target.numpy()[:, :17], tw.numpy()[:, :17])
        assert parts["body"].item() == pytest.approx(body_mean, rel=1e-10)
    else:
        recombined = sum(parts.values())
    assert recombined.item() == pytest.approx(total.item(), rel=1e-10)


def test_kal_reg_term_is_the_part_variance():
    pred, target, tw, kaf = random_inputs(3, 8, 2, 2, seed=11)
    _, parts = HeatmapLoss("kal", parts=SMALL_PARTS, reg_weight=2.5)(pred, target, tw, kaf, return_parts=True)
    lam = kaf.numpy()
    want = np.mean([sum(np.var(lam[b, list(idx)]) for idx in SMALL_PARTS.values()) for b in range(3)])
    assert parts["reg"].item() == pytest.approx(2.5 * want, rel=1e-12)


def test_uncertainty_mode_has_an_interior_optimum():
    # One visible keypoint per part with fixed maps: the lambda gradient of the literal loss is always
    # AWing - MSE > 0 (pushes lambda to 0); the uncertainty term vanishes it at
    # AWing - MSE = beta (1/lambda - 1/(1 - lambda)).
    parts = {"body": (0,), "foot": (1,), "face": (2,), "hand": (3,)}
    pred = torch.full((1, 4, 1, 1), 0.3, dtype=torch.float64)
    target = torch.zeros_like(pred)
    tw = torch.ones(1, 4, dtype=torch.float64)
    delta = float(np_awing(np.array(0.3), np.array(0.0))) - 0.09
    beta = 0.5
    lam_star = (delta + 2 * beta - math.sqrt(delta**2 + 4 * beta**2)) / (2 * delta)
    assert 0 < lam_star < 0.5
    assert delta == pytest.approx(beta * (1 / lam_star - 1 / (1 - lam_star)), rel=1e-9)
    for mode, sign in (("literal", 1.0), ("uncertainty", 0.0)):
        lam = torch.full((1, 4), lam_star, dtype=torch.float64, requires_grad=True)
        total = HeatmapLoss("kal", parts=parts, kaf_mode=mode, kaf_prior_weight=beta)(pred, target, tw, lam)
        (grad,) = torch.autograd.grad(total, lam)
        expected = torch.full_like(grad, sign * delta)
        torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------------------


def _ok_inputs(k=8):
    pred, target, tw, kaf = random_inputs(2, k, 3, 2, seed=12, dtype=torch.float32)
    return pred, target, tw, kaf


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"variant": "focal"}, "variant='focal'"),
        ({"variant": "mse", "gamma": 0.0}, "gamma"),
        ({"variant": "mse", "tau": -1.0}, "tau"),
        ({"variant": "mse", "omega": 0}, "omega"),
        ({"variant": "mse", "theta": -0.5}, "theta"),
        ({"variant": "mse", "epsilon": 0.0}, "epsilon"),
        ({"variant": "mse", "alpha": -2.1}, "alpha"),
        ({"variant": "mse", "omega": float("nan")}, "omega"),
        ({"variant": "kal", "reg_weight": -1.0}, "reg_weight"),
        ({"variant": "kal", "kaf_prior_weight": 0.0}, "kaf_prior_weight"),
        ({"variant": "fowkal", "fwahr_condition": "both"}, "fwahr_condition='both'"),
        ({"variant": "kal", "kaf_mode": "kendall"}, "kaf_mode='kendall'"),
        ({"variant": "mse", "chunk_elements": 0}, "chunk_elements"),
        ({"variant": "heuristic", "parts": {"a": (0, 1), "b": (2,)}}, "missing"),
        ({"variant": "mse", "parts": {"a": (0, 1), "b": (3,)}}, "parts"),
        ({"variant": "mse", "parts": {"a": (0, 1), "b": (1, 2)}}, "parts"),
    ],
)
def test_constructor_errors_name_the_argument(kwargs, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        HeatmapLoss(**kwargs)


def test_forward_errors_name_the_argument_and_value():
    pred, target, tw, kaf = _ok_inputs()
    mse = HeatmapLoss("mse", parts=SMALL_PARTS)
    kal = HeatmapLoss("kal", parts=SMALL_PARTS)
    with pytest.raises(ValueError, match=r"pred must be \[B, K, H, W\], got shape \(2, 8, 6\)"):
        mse(pred.flatten(2), target, tw)
    with pytest.raises(ValueError, match=r"target shape \(2, 8, 3, 3\)"):
        mse(pred, torch.zeros(2, 8, 3, 3), tw)
    with pytest.raises(ValueError, match=r"target_weight must be \[B, K\] = \[2, 8\], got shape \(2, 8, 1\)"):
        mse(pred, target, tw[..., None])
    with pytest.raises(ValueError, match=r"K=133 .*cover 8 keypoints"):
        mse(torch.zeros(2, 133, 3, 2), torch.zeros(2, 133, 3, 2), torch.ones(2, 133))
    with pytest.raises(ValueError, match=r"variant='kal' needs kaf"):
        kal(pred, target, tw)
    with pytest.raises(ValueError, match=r"kaf must be \[B, K\] = \[2, 8\], got shape \(8,\)"):
        kal(pred, target, tw, kaf[0])
    bad = kaf.clone()
    bad[1, 3] = 1.25
    with pytest.raises(ValueError, match=r"kaf must lie in \[0, 1\].*1.25"):
        kal(pred, target, tw, bad)
    bad[1, 3] = float("nan")  # a diverging model: no input error, a non-finite total for the guard
    assert not torch.isfinite(kal(pred, target, tw, bad))
    with pytest.raises(ValueError, match=r"variant='mse' takes no kaf"):
        mse(pred, target, tw, kaf)


def test_elementwise_errors():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match=r"omega must be positive, got -1"):
        awing(x, x, omega=-1)
    with pytest.raises(ValueError, match=r"gamma must be positive, got 0"):
        wahr_weight(x, x, gamma=0)
    with pytest.raises(ValueError, match=r"tau must be positive"):
        fwahr_weight(x, x, tau=0.0)
    with pytest.raises(ValueError, match=r"condition='p'"):
        fwahr_weight(x, x, condition="p")
    with pytest.raises(ValueError, match=r"pred shape \(3,\) differs from target shape \(2,\)"):
        awing(x, torch.zeros(2))


def test_loss_config_is_the_one_set_of_settings():
    from trainer.topdown.losses import LossConfig, LossSettingError

    cfg = LossConfig(variant="kal_wahr", gamma=0.02, tau=0.5, reg_weight=0.3)
    by_config = HeatmapLoss(cfg)
    by_name = HeatmapLoss("kal_wahr", gamma=0.02, tau=0.5, reg_weight=0.3)
    assert by_config.config == by_name.config == cfg
    assert by_config.pixel_config.settings == cfg and by_config.pixel_config.weighting == "wahr"
    # Keyword settings override a given config; unknown ones are refused by name.
    assert HeatmapLoss(cfg, gamma=0.05).config.gamma == 0.05
    with pytest.raises(TypeError, match="gama"):
        HeatmapLoss("mse", gama=0.1)
    with pytest.raises(LossSettingError) as info:
        HeatmapLoss("fowkal", tau=-1.0)
    assert info.value.field == "tau" and "tau must be positive" in str(info.value)
    # The element-wise functions' defaults are LossConfig's.
    import inspect

    defaults = LossConfig()
    assert inspect.signature(awing).parameters["omega"].default == defaults.omega
    assert inspect.signature(fwahr_weight).parameters["tau"].default == defaults.tau


@pytest.mark.parametrize("variant", ["kal", "fowkal"])
def test_non_finite_kaf_gives_a_non_finite_total_not_an_input_error(variant):
    # A diverging model's NaN KAF must reach the training loop's non-finite-loss guard (epoch, lr, hint).
    gen = torch.Generator().manual_seed(0)
    pred = torch.rand(2, 133, 8, 6, generator=gen)
    target = torch.rand(2, 133, 8, 6, generator=gen)
    weight = torch.ones(2, 133)
    kaf = torch.full((2, 133), 0.5)
    kaf[0, 3] = float("nan")
    total = HeatmapLoss(variant)(pred, target, weight, kaf)
    assert not torch.isfinite(total)
    kaf[0, 3] = 1.5  # a finite value outside [0, 1] is still the caller's error
    with pytest.raises(ValueError, match=r"kaf must lie in \[0, 1\]"):
        HeatmapLoss(variant)(pred, target, weight, kaf)
