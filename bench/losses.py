"""Benchmark of the FoWKAL loss family (trainer/topdown/losses.py), all figures measured in the same run.

For every variant: forward+backward time per call of ``HeatmapLoss`` (fused pixel pass) on a
``[32, 133, 64, 48]`` batch (the paper's batch per GPU and heatmap size), its ratio to ``mse``, and its
speed-up over a straightforward eager implementation of the same equations written below (full-size
tensors, autograd through every element-wise op). Then one ``hrnet_w32`` training step (timm, random init,
stride-4 branch + 1x1 conv to 133 heatmaps, MSE, Adam) and the fraction of it the loss would take.

    python bench/losses.py             # full run (CPU: several minutes on 2 cores)
    python bench/losses.py --quick     # small batch, few repeats, < 1 minute on 2 CPU cores
    python bench/losses.py --kaf-toy   # the lambda-collapse measurement quoted in HeatmapLoss's docstring
    python bench/losses.py --device cuda

Goals: fowkal >= 3x faster than the eager baseline, loss <= 5% of an hrnet_w32 step.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.datasets.keypoints import COCO_WHOLEBODY_PARTS  # noqa: E402
from trainer.topdown.losses import LOSS_VARIANTS, HeatmapLoss  # noqa: E402

# ------------------------------------------------------------------------------------------------------------
# Straightforward eager baseline: the equations as one would first write them, autograd everywhere.
# ------------------------------------------------------------------------------------------------------------

OMEGA, THETA, EPSILON, ALPHA, GAMMA, TAU = 14.0, 0.5, 1.0, 2.1, 0.01, 0.01


def eager_awing(pred, target):
    delta = (target - pred).abs()
    a = ALPHA - target
    A = OMEGA * (1 / (1 + torch.pow(THETA / EPSILON, a))) * a * torch.pow(THETA / EPSILON, a - 1) / EPSILON
    C = THETA * A - OMEGA * torch.log(1 + torch.pow(THETA / EPSILON, a))
    small = OMEGA * torch.log(1 + torch.pow(delta / EPSILON, a))
    large = A * delta - C
    return torch.where(delta < THETA, small, large)


def eager_wahr(pred, target):
    pg = torch.pow(target, GAMMA)
    return pg * torch.abs(1 - pred) + torch.abs(pred) * (1 - pg)


def eager_fwahr(pred, target):
    return torch.where(pred >= 2 ** (-1 / GAMMA), eager_wahr(pred, target), TAU * target)


def eager_loss(variant, pred, target, target_weight, kaf):
    weighting = LOSS_VARIANTS[variant].weighting
    weight = {"none": None, "wahr": eager_wahr, "fwahr": eager_fwahr}[weighting]

    def pixel_mean(loss, p, t):
        if weight is not None:
            loss = weight(p, t) * loss
        return loss.mean(dim=(2, 3))

    parts = COCO_WHOLEBODY_PARTS
    if variant == "mse":
        return (pixel_mean((pred - target) ** 2, pred, target) * target_weight).mean()
    if variant == "awing":
        return (pixel_mean(eager_awing(pred, target), pred, target) * target_weight).mean()
    if variant.startswith("heuristic"):
        bf = list(parts["body"] + parts["foot"])
        fh = list(parts["face"] + parts["hand"])
        n = len(bf) + len(fh)
        p_bf, t_bf, p_fh, t_fh = pred[:, bf], target[:, bf], pred[:, fh], target[:, fh]
        l_bf = (pixel_mean((p_bf - t_bf) ** 2, p_bf, t_bf) * target_weight[:, bf]).mean(dim=1)
        l_fh = (pixel_mean(eager_awing(p_fh, t_fh), p_fh, t_fh) * target_weight[:, fh]).mean(dim=1)
        return (len(fh) / n * l_bf + len(bf) / n * l_fh).mean()
    l_aw = pixel_mean(eager_awing(pred, target), pred, target)
    l_mse = pixel_mean((pred - target) ** 2, pred, target)
    adaptive = (kaf * l_aw + (1 - kaf) * l_mse) * target_weight
    total = 0
    for idx in parts.values():
        idx = list(idx)
        total = total + adaptive[:, idx].mean(dim=1) + kaf[:, idx].var(dim=1, unbiased=False)
    return total.mean()


# ------------------------------------------------------------------------------------------------------------
# Inputs and timing
# ------------------------------------------------------------------------------------------------------------


def make_inputs(batch, height, width, device, seed=0):
    """Gaussian (sigma 2) target heatmaps at random spots; predictions = a noisy, shrunken copy."""
    gen = torch.Generator().manual_seed(seed)
    k = 133
    ys = torch.arange(height, dtype=torch.float32).view(1, 1, height, 1)
    xs = torch.arange(width, dtype=torch.float32).view(1, 1, 1, width)
    cy = torch.rand(batch, k, 1, 1, generator=gen) * height
    cx = torch.rand(batch, k, 1, 1, generator=gen) * width
    target = torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * 2.0**2))
    pred = 0.7 * target + 0.05 * torch.randn(target.shape, generator=gen)
    target_weight = (torch.rand(batch, k, generator=gen) > 0.1).float()
    kaf = torch.rand(batch, k, generator=gen)
    return pred.to(device), target.to(device), target_weight.to(device), kaf.to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device, repeats, warmup=1):
    """Median seconds per call of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def loss_step(loss_fn, pred, target, target_weight, kaf):
    """One forward+backward of a loss; gradients w.r.t. pred (and kaf) as in training."""
    p = pred.detach().requires_grad_()
    lam = kaf.detach().requires_grad_() if kaf is not None else None
    total = loss_fn(p, target, target_weight, lam)
    total.backward()
    return total.detach()


def hrnet_step_seconds(batch, device, repeats):
    """Seconds of one hrnet_w32 training step (stride-4 branch + 1x1 conv to 133 heatmaps, MSE, Adam)."""
    import timm

    backbone = timm.create_model(
        "hrnet_w32", pretrained=False, features_only=True, feature_location="", out_indices=(1,)
    )
    head = torch.nn.Conv2d(backbone.feature_info.channels()[0], 133, kernel_size=1)
    model = torch.nn.Sequential(backbone, _First(), head).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4)
    images = torch.randn(batch, 3, 256, 192, device=device)
    pred0, target, target_weight, _ = make_inputs(batch, 64, 48, device, seed=1)
    loss_fn = HeatmapLoss("mse")

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(images), target, target_weight)
        loss.backward()
        optimizer.step()

    return time_call(step, device, repeats)


class _First(torch.nn.Module):
    def forward(self, features):
        return features[0]


# ------------------------------------------------------------------------------------------------------------
# KAF toy problem: does plain gradient descent on Eq. 8 drive lambda to 0?
# ------------------------------------------------------------------------------------------------------------


def gaussian_maps(cy, cx, height, width, sigma=2.0):
    ys = torch.arange(height, dtype=torch.float32, device=cy.device).view(1, 1, height, 1)
    xs = torch.arange(width, dtype=torch.float32, device=cy.device).view(1, 1, 1, width)
    return torch.exp(-((ys - cy[..., None, None]) ** 2 + (xs - cx[..., None, None]) ** 2) / (2 * sigma**2))


def kaf_toy(steps=400, device="cpu"):
    """Free heatmaps and one free KAF logit per keypoint, trained on literal and uncertainty KAL.

    Label noise keeps the fit imperfect (as in real data): each step the Gaussian targets (sigma 2) are
    drawn around fixed keypoints with a 1-pixel jitter, so AWing - MSE stays positive.
    """
    device = torch.device(device)
    batch, height, width = 4, 16, 12
    print(
        f"KAF toy: {batch}x133 free {height}x{width} heatmaps (init 0), targets sigma 2 with 1-px label "
        "jitter, lambda = sigmoid(logit) per keypoint (init 0.5), kal variant"
    )
    gen = torch.Generator().manual_seed(3)
    cy = (torch.rand(batch, 133, generator=gen) * (height - 4) + 2).to(device)
    cx = (torch.rand(batch, 133, generator=gen) * (width - 4) + 2).to(device)
    target_weight = torch.ones(batch, 133, device=device)
    for mode in ("literal", "uncertainty"):
        for opt_name, lr in (("SGD", 1.0), ("Adam", 1e-2)):
            torch.manual_seed(0)
            heat = torch.zeros(batch, 133, height, width, device=device, requires_grad=True)
            logit = torch.zeros(133, device=device, requires_grad=True)
            opt = (torch.optim.SGD if opt_name == "SGD" else torch.optim.Adam)([heat, logit], lr=lr)
            loss_fn = HeatmapLoss("kal", kaf_mode=mode)
            marks = {}
            for step in range(1, steps + 1):
                target = gaussian_maps(cy + torch.randn_like(cy), cx + torch.randn_like(cx), height, width)
                lam = torch.sigmoid(logit).expand(batch, -1)
                loss = loss_fn(heat, target, target_weight, lam)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if step in (1, steps // 10, steps):
                    lam = torch.sigmoid(logit).detach()
                    marks[step] = {n: float(lam[list(i)].mean()) for n, i in COCO_WHOLEBODY_PARTS.items()}
            line = "; ".join(
                f"step {s}: " + " ".join(f"{n}={v:.3g}" for n, v in m.items()) for s, m in marks.items()
            )
            print(f"  {mode:11s} {opt_name:4s} lr={lr:g}: mean lambda per part  {line}")


# ------------------------------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="small batch, few repeats (< 1 min on 2 CPU cores)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="loss batch (default 32; --quick: 4)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed calls per figure (default 5; quick 2)"
    )
    parser.add_argument("--hrnet-batch", type=int, default=None, help="hrnet step batch, scaled per sample")
    parser.add_argument("--kaf-toy", action="store_true", help="run the KAF collapse toy problem and exit")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.kaf_toy:
        kaf_toy(device=args.device)
        return
    batch = args.batch or (4 if args.quick else 32)
    repeats = args.repeats or (2 if args.quick else 5)
    hrnet_batch = args.hrnet_batch or (1 if args.quick else (batch if device.type == "cuda" else 4))
    torch.manual_seed(0)
    print(
        f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"batch=[{batch},133,64,48] repeats={repeats} (median of forward+backward)"
    )
    pred, target, target_weight, kaf = make_inputs(batch, 64, 48, device)

    rows = []
    for variant in LOSS_VARIANTS:
        lam = kaf if LOSS_VARIANTS[variant].needs_kaf else None
        fused = HeatmapLoss(variant).to(device)
        # Same value from both implementations, so the timing compares like with like.
        a = loss_step(fused, pred, target, target_weight, lam)
        b = loss_step(
            lambda p, t, w, k, v=variant: eager_loss(v, p, t, w, k), pred, target, target_weight, lam
        )
        if not torch.allclose(a, b, rtol=1e-4, atol=1e-6):
            raise SystemExit(f"{variant}: fused loss {a.item()} != eager baseline {b.item()}")
        t_fused = time_call(
            lambda f=fused, k=lam: loss_step(f, pred, target, target_weight, k), device, repeats
        )
        t_eager = time_call(
            lambda v=variant, k=lam: loss_step(
                lambda p, t, w, kk: eager_loss(v, p, t, w, kk), pred, target, target_weight, k
            ),
            device,
            repeats,
        )
        rows.append((variant, t_fused, t_eager))
    t_mse = rows[0][1]
    print(f"{'variant':16s} {'ms/call':>9s} {'x mse':>7s} {'eager ms':>9s} {'speed-up':>9s}")
    for variant, t_fused, t_eager in rows:
        ratio, speedup = t_fused / t_mse, t_eager / t_fused
        print(f"{variant:16s} {t_fused * 1e3:9.1f} {ratio:7.2f} {t_eager * 1e3:9.1f} {speedup:8.2f}x")

    step = hrnet_step_seconds(hrnet_batch, device, max(1, repeats // 2 if args.quick else 2))
    step_at_batch = step * batch / hrnet_batch
    scaled = "" if hrnet_batch == batch else f" (measured at batch {hrnet_batch}, scaled linearly per sample)"
    print(f"hrnet_w32 training step at batch {batch}: {step_at_batch:.2f} s{scaled}")
    fowkal = dict((v, t) for v, t, _ in rows)["fowkal"]
    print(f"fowkal loss / hrnet_w32 step: {100 * fowkal / step_at_batch:.2f}%  (goal <= 5%)")
    speedup = dict((v, e / t) for v, t, e in rows)["fowkal"]
    print(f"fowkal speed-up over eager: {speedup:.2f}x  (goal >= 3x)")
    if not math.isfinite(speedup):
        raise SystemExit("non-finite timing")


if __name__ == "__main__":
    main()
