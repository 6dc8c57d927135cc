"""KAPAO on the GPU: KAPAO-S at 1280, whole-body (K = 133), beside HRNet-w32's top-down path per person crop.

    python bench/gpu_kapao.py --out DIR [--dry-run] [--sections train latency topdown]

Sections (figures in DIR/gpu_kapao.json, the tables in DIR/gpu_kapao.md, both rewritten after each section):

- ``train``: training img/s of KAPAO-S at 1280, batch 16, bf16 autocast + channels-last: the family's own
  step (``KapaoTraining.step``: uint8 images to the device, forward, ``KapaoLoss`` in float32) + backward +
  the SGD step, on synthetic images with random but valid targets (people with boxes inside the image and
  keypoints inside their boxes, as the data set's label rows); CUDA-synchronised timing of each step after a
  warm-up (cuDNN autotuning). Also the peak memory (``torch.cuda.max_memory_allocated``), ``KapaoLoss``
  forward + backward alone, the EMA update, and FLOPs per image (counted on the meta device) as a share of
  the bf16 peak (``--peak-tflops``). The loop steps SGD every ``round(64 / batch)`` = 4 batches at batch 16 on
  one GPU; here every batch (the step's cost, not the recipe's).
- ``latency``: batch-1 inference of KAPAO-S at 1280 (eval, bf16, channels-last, as ``predict_poses``), split
  into the forward and the post-processing (``poses_from_outputs``: decoding, NMS of both object types,
  fusion). An untrained model finds almost no candidates, so the post-processing is also timed on a planted
  crowd of 20 people (``bench/kapao.py``'s ``crowd_outputs``, on the device): the figure that matters.
- ``topdown``: HRNet-w32 at 256x192 per person crop, the same bf16 + channels-last: the forward of the crops
  and of their mirrors (the flip test, as ``predict_keypoints``) and ``decode_heatmaps`` (flip-back + DARK +
  the crop affine), for 1 crop and 20 crops (20 people). The top-down path also needs a person detector,
  not measured here.

``--dry-run``: KAPAO-S at 128 (batch 2), a crowd of 4 at 256, hrnet_w18_small at 128x96 (1 and 2 crops), a
call or two each: the whole path in about a minute on a CPU, so that the one GPU run does not fail on a typo
(figures meaningless, and marked so).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

KAPAO_CONFIG = REPO / "configs" / "kapao_wholebody_s.yaml"
SECTIONS = ("train", "latency", "topdown")


# ------------------------------------------------------------------------------------------------- helpers


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device):
    """``(fn(), seconds)``, the device synchronised before and after."""
    _synchronize(device)
    started = time.perf_counter()
    result = fn()
    _synchronize(device)
    return result, time.perf_counter() - started


def _median_ms(seconds: list[float]) -> float:
    return 1e3 * statistics.median(seconds)


def random_targets(batch: int, num_keypoints: int, input_size: int, people: int, seed: int):
    """Label rows ``[N, 6 + 3K]`` as the KAPAO data set makes them (pose objects, then keypoint objects) of
    random people: boxes inside the input, keypoints inside their boxes, a third of them unlabelled."""
    import numpy as np
    import torch

    from trainer.kapao.labels import label_rows, pose_and_keypoint_objects

    rng = np.random.default_rng(seed)
    rows = []
    for image in range(batch):
        wh = rng.uniform(0.05, 0.5, (people, 2)) * input_size
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


def _kapao_config(settings: dict):
    from trainer.config import load_config

    overrides = [f"data.input_size={settings['input_size']}", f"batch_size={settings['batch']}"]
    return load_config(KAPAO_CONFIG, overrides)


def _kapao_model(cfg, device):
    import torch

    from trainer.families import get_family

    torch.manual_seed(0)
    model = get_family(cfg.family).build_model(cfg, pretrained=False).to(device)
    return model.to(memory_format=torch.channels_last)


# --------------------------------------------------------------------------------------------------- train


def _train_flops_per_image(cfg, input_size: int) -> tuple[float, float]:
    """Forward and forward + backward FLOPs of one image (convolutions and matrix products), on the meta
    device: no compute, no device memory."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from trainer.families import get_family

    model = get_family(cfg.family).build_model(cfg, pretrained=False).to("meta")
    images = torch.empty(1, 3, input_size, input_size, device="meta")
    with FlopCounterMode(display=False) as forward_only, torch.no_grad():
        model(images)
    with FlopCounterMode(display=False) as train_step:
        sum(out.float().sum() for out in model(images)).backward()
    return forward_only.get_total_flops(), train_step.get_total_flops()


def section_train(settings: dict) -> dict:
    import torch

    from trainer.families import get_family
    from trainer.kapao.dataset import images_to_float
    from trainer.kapao.family import num_keypoints

    device = torch.device(settings["device"])
    cfg = _kapao_config(settings)
    family = get_family(cfg.family)
    batch, size = settings["batch"], settings["input_size"]
    model = _kapao_model(cfg, device)
    training = family.training(cfg, model, device)
    optimizer, _, _ = family.build_optimizer(cfg, model, iters_per_epoch=1000)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)
    if device.type == "cuda":
        images = images.pin_memory()  # as the loop's DataLoader (pin_memory on CUDA)
    targets = random_targets(batch, num_keypoints(cfg), size, settings["people"], seed=0)
    step_batch = {"images": images, "targets": targets}

    def step():
        optimizer.zero_grad(set_to_none=True)
        total, _ = training.step(model, step_batch, device, torch.bfloat16, channels_last=True)
        total.backward()
        optimizer.step()
        return total

    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warmup_s = [_timed(step, device)[1] for _ in range(settings["warmup"])]
    seconds, totals = [], []
    for _ in range(settings["steps"]):
        total, elapsed = _timed(step, device)
        seconds.append(elapsed)
        totals.append(total.item())
    if not all(math.isfinite(value) for value in totals):
        raise FloatingPointError(f"non-finite KAPAO loss in the timed steps: {totals}")
    step_s = statistics.median(seconds)
    out = {
        "batch": batch,
        "input_size": size,
        "targets": int(targets.shape[0]),
        "warmup_s": warmup_s,
        "step_ms": 1e3 * step_s,
        "step_ms_runs": [1e3 * s for s in seconds],
        "img_per_s": batch / step_s,
        "loss_first_last": [totals[0], totals[-1]],
    }
    if device.type == "cuda":
        out["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30

    # KapaoLoss forward + backward alone, on the bf16 head outputs of this batch.
    float_images = images_to_float(images.to(device)).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        outputs = model(float_images)
    device_targets = targets.to(device)

    def loss_step(outputs=outputs):
        head = [o.detach().requires_grad_() for o in outputs]
        training.loss_fn(head, device_targets)[0].backward()

    loss_s = [_timed(loss_step, device)[1] for _ in range(settings["warmup"] + settings["repeats"])]
    loss_s = loss_s[settings["warmup"] :]
    out["loss_ms"] = _median_ms(loss_s)
    out["loss_share_of_step"] = statistics.median(loss_s) / step_s
    outputs = float_images = loss_step = None  # free the batch's activations before the EMA
    if training.ema is not None:
        ema_s = [_timed(lambda: training.after_optimizer_step(model), device)[1] for _ in range(5)]
        out["ema_update_ms"] = _median_ms(ema_s[1:])

    forward, train_total = _train_flops_per_image(cfg, size)
    out["forward_gflop_per_image"] = forward / 1e9
    out["train_gflop_per_image"] = train_total / 1e9
    out["achieved_tflops"] = train_total * out["img_per_s"] / 1e12
    out["share_of_peak"] = out["achieved_tflops"] / settings["peak_tflops"]
    memory = f", peak {out['peak_allocated_gib']:.1f} GiB" if "peak_allocated_gib" in out else ""
    print(
        f"[train] KAPAO-S {size} batch {batch}: {out['img_per_s']:.1f} img/s (step {out['step_ms']:.1f} ms, "
        f"loss {out['loss_ms']:.1f} ms){memory}",
        flush=True,
    )
    return out


# ------------------------------------------------------------------------------------------------- latency


def section_latency(settings: dict) -> dict:
    import numpy as np
    import torch

    from bench.kapao import crowd_outputs
    from trainer.kapao.dataset import images_to_float
    from trainer.kapao.postprocess import candidates, poses_from_outputs

    device = torch.device(settings["device"])
    cfg = _kapao_config(settings)
    size = settings["input_size"]
    model = _kapao_model(cfg, device).eval()
    image = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8).to(device)
    letterbox = [(1.0, (0.0, 0.0))]

    @torch.no_grad()
    def forward():
        images = images_to_float(image).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            outputs = model(images)
        return [o.float() for o in outputs]

    def post(outputs):
        return lambda: poses_from_outputs(outputs, cfg.eval, letterbox)

    forward_s, post_s = [], []
    for index in range(settings["warmup"] + settings["repeats"]):
        outputs, seconds = _timed(forward, device)
        poses, post_seconds = _timed(post(outputs), device)
        if index >= settings["warmup"]:
            forward_s.append(seconds)
            post_s.append(post_seconds)
    own = candidates(outputs, cfg.eval.tau_cp, cfg.eval.tau_ck)[0]
    out = {
        "input_size": size,
        "forward_ms": _median_ms(forward_s),
        "post_ms_own_outputs": _median_ms(post_s),
        "own_candidates": [len(own.pose_scores), len(own.kp_scores)],
        "own_poses": len(poses[0][1]),
    }
    del outputs

    rng = np.random.default_rng(133)
    crowd = crowd_outputs(133, settings["crowd_size"], settings["crowd_people"], rng)
    crowd = [o.to(device) for o in crowd]
    found = candidates(crowd, cfg.eval.tau_cp, cfg.eval.tau_ck)[0]
    crowd_s = [_timed(post(crowd), device)[1] for _ in range(settings["warmup"] + settings["repeats"])]
    out.update(
        {
            "crowd_size": settings["crowd_size"],
            "crowd_people": settings["crowd_people"],
            "crowd_candidates": [len(found.pose_scores), len(found.kp_scores)],
            "post_ms_crowd": _median_ms(crowd_s[settings["warmup"] :]),
        }
    )
    print(
        f"[latency] KAPAO-S {size} batch 1: forward {out['forward_ms']:.2f} ms, post-processing "
        f"{out['post_ms_own_outputs']:.2f} ms (own outputs), {out['post_ms_crowd']:.2f} ms "
        f"(crowd of {settings['crowd_people']})",
        flush=True,
    )
    return out


# ------------------------------------------------------------------------------------------------- topdown


def section_topdown(settings: dict) -> dict:
    import numpy as np
    import torch

    from trainer.topdown.inference import decode_heatmaps
    from trainer.topdown.model import build_pose_model

    device = torch.device(settings["device"])
    torch.manual_seed(0)
    model = build_pose_model(settings["hrnet"], 133, with_kaf=False).to(device)
    model = model.to(memory_format=torch.channels_last).eval()
    height, width = settings["crop_hw"]
    out = {"backbone": settings["hrnet"], "crop_hw": list(settings["crop_hw"])}
    for crops in settings["crops"]:
        images = torch.randn(crops, 3, height, width, generator=torch.Generator().manual_seed(crops))
        images = images.to(device).contiguous(memory_format=torch.channels_last)
        center = np.tile([[320.0, 240.0]], (crops, 1))
        scale = np.tile([[150.0, 200.0]], (crops, 1))

        @torch.no_grad()
        def forward(images=images):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                heatmaps = model(images)[0].float()
                flipped = model(images.flip(-1))[0].float()
            return heatmaps, flipped

        forward_s, decode_s = [], []
        for index in range(settings["warmup"] + settings["repeats"]):
            (heatmaps, flipped), seconds = _timed(forward, device)
            stride = width / heatmaps.shape[-1]
            _, decode_seconds = _timed(
                lambda h=heatmaps, f=flipped, c=center, s=scale, st=stride: decode_heatmaps(
                    h, f, c, s, stride=st
                ),
                device,
            )
            if index >= settings["warmup"]:
                forward_s.append(seconds)
                decode_s.append(decode_seconds)
        out[str(crops)] = {"forward_flip_ms": _median_ms(forward_s), "decode_ms": _median_ms(decode_s)}
        print(
            f"[topdown] {settings['hrnet']} {height}x{width}, {crops} crop(s) + mirrors: forward "
            f"{out[str(crops)]['forward_flip_ms']:.2f} ms, decode {out[str(crops)]['decode_ms']:.2f} ms",
            flush=True,
        )
    return out


# ---------------------------------------------------------------------------------------------------- main


def _settings(args) -> dict:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    common = {"device": device, "peak_tflops": args.peak_tflops}
    if args.dry_run:
        return common | {
            "input_size": 128,
            "batch": 2,
            "people": 2,
            "warmup": 1,
            "steps": 1,
            "repeats": 2,
            "crowd_size": 256,
            "crowd_people": 4,
            "hrnet": "hrnet_w18_small",  # bf16 on a CPU is slow: hrnet_w32 takes 15 s a crop here
            "crop_hw": (128, 96),  # HRNet's branches need a multiple of 32
            "crops": (1, 2),
        }
    return common | {
        "input_size": 1280,
        "batch": 16,
        "people": 6,
        "warmup": args.warmup,
        "steps": args.steps,
        "repeats": args.repeats,
        "crowd_size": 1280,
        "crowd_people": 20,
        "hrnet": "hrnet_w32",
        "crop_hw": (256, 192),
        "crops": (1, 20),
    }


def _markdown(report: dict) -> str:
    settings = report["settings"]
    lines = [f"Machine: {report['machine']}", ""]
    train = report.get("train")
    if isinstance(train, dict) and "error" not in train:
        memory = f"{train['peak_allocated_gib']:.1f}" if "peak_allocated_gib" in train else "- (CPU)"
        lines += [
            f"KAPAO-S, K = 133, input {train['input_size']}, batch {train['batch']}, bf16 + channels-last "
            f"({train['targets']} target rows):",
            "",
            "| img/s | step ms | peak GiB | KapaoLoss fwd+bwd ms (share) | EMA update ms | "
            "train GFLOP/img | TFLOP/s (share of peak) |",
            "|---|---|---|---|---|---|---|",
            f"| {train['img_per_s']:.1f} | {train['step_ms']:.1f} | {memory} | {train['loss_ms']:.1f} "
            f"({100 * train['loss_share_of_step']:.1f}%) | {train.get('ema_update_ms', float('nan')):.1f} | "
            f"{train['train_gflop_per_image']:.1f} | {train['achieved_tflops']:.1f} "
            f"({100 * train['share_of_peak']:.1f}% of {settings['peak_tflops']:.0f}) |",
            "",
        ]
    latency = report.get("latency")
    topdown = report.get("topdown")
    rows = []
    if isinstance(latency, dict) and "error" not in latency:
        rows.append(
            f"| KAPAO-S {latency['input_size']} whole image, batch 1 | {latency['forward_ms']:.2f} | "
            f"{latency['post_ms_own_outputs']:.2f} (own outputs: {latency['own_candidates'][0]} / "
            f"{latency['own_candidates'][1]} candidates); {latency['post_ms_crowd']:.2f} (crowd of "
            f"{latency['crowd_people']}: {latency['crowd_candidates'][0]} / "
            f"{latency['crowd_candidates'][1]}) |"
        )
    if isinstance(topdown, dict) and "error" not in topdown:
        height, width = topdown["crop_hw"]
        for crops in settings["crops"]:
            cell = topdown[str(crops)]
            rows.append(
                f"| {topdown['backbone']} {height}x{width}, {crops} crop(s) + mirrors (flip test) | "
                f"{cell['forward_flip_ms']:.2f} | {cell['decode_ms']:.2f} (flip-back + DARK) |"
            )
    if rows:
        lines += [
            "| inference (bf16, channels-last) | forward ms | post-processing ms (pose / keypoint "
            "candidates) |",
            "|---|---|---|",
            *rows,
            "",
            "The top-down rows need a person detector's boxes as well (not measured).",
            "",
        ]
    for section, value in report.items():
        if isinstance(value, dict) and "error" in value:
            lines.append(f"- {section}: FAILED: {value['error']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="directory for gpu_kapao.json / .md")
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny sizes: the whole path in about a minute on a CPU"
    )
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), help="which to run, in order")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls first (cuDNN autotuning)")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per latency figure")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="dense bf16 peak to compare with")
    args = parser.parse_args(argv)
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown --sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")

    import torch

    torch.backends.cudnn.benchmark = True  # as the training loop on CUDA
    settings = _settings(args)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    report: dict = {
        "machine": f"{platform.node()}: {gpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}, Python {platform.python_version()}"
        + (
            f" (DRY RUN: tiny sizes, KAPAO-S at {settings['input_size']}, {settings['hrnet']} at "
            f"{settings['crop_hw'][0]}x{settings['crop_hw'][1]}: figures meaningless)"
            if args.dry_run
            else ""
        ),
        "settings": settings,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    print(report["machine"], flush=True)
    measure = {"train": section_train, "latency": section_latency, "topdown": section_topdown}
    for section in args.sections:
        started = time.perf_counter()
        try:
            report[section] = measure[section](settings)
        except Exception as error:  # one broken section must not lose the others' figures
            traceback.print_exc()
            report[section] = {"error": f"{type(error).__name__}: {error}"}
        report.setdefault("seconds", {})[section] = time.perf_counter() - started
        if settings["device"] == "cuda":
            torch.cuda.empty_cache()
        # Rewritten after each section: a run stopped by its time limit keeps what it measured.
        (args.out / "gpu_kapao.json").write_text(json.dumps(report, indent=2, default=str))
        (args.out / "gpu_kapao.md").write_text(_markdown(report))
    markdown = _markdown(report)
    print(markdown, flush=True)
    return 1 if any(isinstance(v, dict) and "error" in v for v in report.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
