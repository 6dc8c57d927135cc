"""The GPU path, measured: step throughput (plain vs Ray Train), the loss's share, FLOPs, DataLoader headroom.

    python bench/gpu_bench.py --out DIR [--dry-run] [--sections ratio loss flops loader]

Sections (each a fresh measurement, figures also in DIR/gpu_bench.json, the table in DIR/gpu_bench.md):

- ``ratio``: HRNet-w32 at 256x192, bf16 autocast + channels-last, batch 32 and 64: img/s of the plain loop and
  of one Ray Train worker (``use_gpu``), each in a fresh process, alternating ABBA over rounds. The step is
  ``bench/train_throughput.py``'s ``measure_steps`` (forward, MSE, backward, Adam on a fixed batch) run
  under bf16 autocast; that file's own fresh-process wrappers call it in float32 only, so the two wrappers
  here differ from them in that one line. Goal: ratio >= 0.95.
- ``loss``: the ``fowkal`` loss forward + backward on ``[B, 133, 64, 48]`` float32 heatmaps (as the loop calls
  it, on the bf16 outputs cast to float32) as a share of the plain step at the same batch: the fused pass,
  the autograd formulation, and ``torch.compile`` of the autograd formulation. Goal: share <= 5%.
- ``flops``: model FLOPs per image (``torch.utils.flop_counter``: convolutions and matrix products, forward
  and forward + backward) and the achieved share of the bf16 peak (``--peak-tflops``, 790 for an H200's dense
  bf16 as measured on one) at the plain loop's img/s.
- ``loader``: samples/s of the training pipeline (``WholeBodyTopDownDataset``, ``train=True``, batch 32) with
  4, 8 and 16 DataLoader processes on the real mini COCO-WholeBody images (640x480 JPEGs, read again and
  again: page cache, as a local SSD), against the plain loop's img/s: is training data-bound?

``--dry-run``: hrnet_w18_small at 128x96, batches 2 and 4, a few steps, 1-2 loader processes: the whole path
in a few minutes on a CPU, so that the one GPU run does not fail on a typo (figures meaningless).
"""

from __future__ import annotations

import argparse
import json
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

from bench.train_throughput import (  # noqa: E402
    _median,
    measure_plain_in_fresh_process,
    measure_steps,
    measure_under_ray_train,
)

MINI = Path(os.environ.get("FOWKAL_MINI_DIR", REPO.parent / "shared" / "data" / "coco_wholebody_mini"))
NUM_KEYPOINTS = 133


# ---------------------------------------------------------------------------------------- plain vs Ray Train


def measure_bf16_steps(config: dict) -> dict:
    """``measure_steps`` (channels-last on CUDA) with its forward under bf16 autocast, as the loop's amp."""
    import torch

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.autocast(device_type, dtype=torch.bfloat16):
        return measure_steps(config)


def plain_in_fresh_process(config: dict) -> dict:
    return measure_plain_in_fresh_process(config, step_fn=measure_bf16_steps)


def ray_train_in_fresh_worker(config: dict) -> dict:
    """One Train V2 worker (a fresh actor of a local Ray started for this measurement) runs the same step."""
    return measure_under_ray_train(config, step_fn=measure_bf16_steps, name="gpu-bench")


def section_ratio(settings: dict) -> dict:
    import torch

    out = {}
    for batch in settings["batches"]:
        config = {
            "backbone": settings["backbone"],
            "input_hw": settings["input_hw"],
            "batch": batch,
            "steps": settings["steps"],
            "warmup": settings["warmup"],
            "threads": torch.get_num_threads(),
            "device": settings["device"],
        }
        figures: dict[str, list[float]] = {"plain": [], "ray": []}
        for round_index in range(settings["rounds"]):
            order = ("plain", "ray") if round_index % 2 == 0 else ("ray", "plain")
            for kind in order:
                # Let the previous measurement's processes (a stopping local Ray) leave the CPUs first.
                time.sleep(settings["settle_s"])
                measure = plain_in_fresh_process if kind == "plain" else ray_train_in_fresh_worker
                result = measure(config)
                figures[kind].append(result["img_per_s"])
                print(
                    f"[ratio] batch {batch} round {round_index + 1} {kind}: {result['img_per_s']:.1f} img/s "
                    f"(median step {result['median_step_s'] * 1e3:.1f} ms, {result['device']})",
                    flush=True,
                )
        plain, ray = _median(figures["plain"]), _median(figures["ray"])
        out[str(batch)] = {
            "plain_img_per_s": plain,
            "ray_img_per_s": ray,
            "ratio": ray / plain,
            "plain_runs": figures["plain"],
            "ray_runs": figures["ray"],
        }
    return out


# ------------------------------------------------------------------------------------------------ loss share


def _time_cuda(fn, device, repeats: int, warmup: int) -> float:
    """Median seconds of ``fn()`` (CUDA events on a GPU, perf_counter on the CPU)."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


def section_loss(settings: dict, step_img_per_s: dict) -> dict:
    import torch

    from bench.losses import make_inputs
    from trainer.topdown.losses import HeatmapLoss

    device = torch.device(settings["device"])
    height, width = settings["input_hw"][0] // 4, settings["input_hw"][1] // 4
    out = {}
    for batch in settings["batches"]:
        pred, target, target_weight, kaf = make_inputs(batch, height, width, device, seed=0)
        variants = {
            "fused": HeatmapLoss("fowkal", fused=True),
            "autograd": HeatmapLoss("fowkal", fused=False),
        }
        variants["compiled autograd"] = torch.compile(HeatmapLoss("fowkal", fused=False))
        row = {}
        for name, loss_fn in variants.items():

            def step(loss_fn=loss_fn, inputs=(pred, target, target_weight, kaf)):
                p, t, w, k = inputs
                loss_fn(p.detach().requires_grad_(), t, w, k.detach().requires_grad_()).backward()

            try:
                started = time.perf_counter()
                step()  # first call: compilation, if any
                first_call = time.perf_counter() - started
                seconds = _time_cuda(step, device, settings["loss_repeats"], warmup=2)
            except Exception as error:  # torch.compile may not support this graph on this machine
                row[name] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
                print(f"[loss] batch {batch} {name}: FAILED {row[name]['error']}", flush=True)
                continue
            step_s = batch / step_img_per_s[str(batch)] if str(batch) in step_img_per_s else None
            row[name] = {
                "ms": seconds * 1e3,
                "first_call_s": first_call,
                "share_of_step": None if step_s is None else seconds / step_s,
            }
            share = "" if step_s is None else f", {100 * seconds / step_s:.2f}% of the plain step"
            print(f"[loss] batch {batch} {name}: {seconds * 1e3:.2f} ms{share}", flush=True)
        out[str(batch)] = row
    return out


# ----------------------------------------------------------------------------------------------------- FLOPs


def section_flops(settings: dict, step_img_per_s: dict) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from trainer.topdown.model import build_pose_model

    device = torch.device(settings["device"])
    model = build_pose_model(settings["backbone"], NUM_KEYPOINTS, with_kaf=False).to(device)
    images = torch.randn(1, 3, *settings["input_hw"], device=device)
    with FlopCounterMode(display=False) as forward_only:
        with torch.no_grad():
            model(images)
    with FlopCounterMode(display=False) as train_step:
        heatmaps, _ = model(images)
        heatmaps.float().square().mean().backward()
    forward, total = forward_only.get_total_flops(), train_step.get_total_flops()
    out = {"forward_gflop_per_image": forward / 1e9, "train_gflop_per_image": total / 1e9}
    peak = settings["peak_tflops"] * 1e12
    for batch, img_per_s in step_img_per_s.items():
        out[f"achieved_tflops_batch{batch}"] = total * img_per_s / 1e12
        out[f"share_of_peak_batch{batch}"] = total * img_per_s / peak
    print(f"[flops] {json.dumps(out)}", flush=True)
    return out


# ------------------------------------------------------------------------------------------ loader headroom


def section_loader(settings: dict, step_img_per_s: dict) -> dict:
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    from trainer.topdown.data import PipelineConfig, WholeBodyTopDownDataset

    ann = MINI / "test_coco_wholebody.json"
    if not ann.is_file():
        raise FileNotFoundError(f"{ann} not found (set FOWKAL_MINI_DIR to the mini COCO-WholeBody copy)")
    height, width = settings["input_hw"]
    config = PipelineConfig(input_size=(width, height), heatmap_size=(width // 4, height // 4))
    dataset = WholeBodyTopDownDataset(ann, MINI, config=config, train=True)
    batch, batches = settings["loader_batch"], settings["loader_batches"]
    out = {}
    for workers in settings["loader_workers"]:
        sampler = RandomSampler(dataset, replacement=True, num_samples=batch * batches)
        loader = DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers)
        iterator = iter(loader)
        next(iterator)  # worker start-up is not throughput
        started = time.perf_counter()
        count = sum(len(item["image"]) for item in iterator)
        samples_per_s = count / (time.perf_counter() - started)
        out[str(workers)] = {"samples_per_s": samples_per_s}
        for step_batch, img_per_s in step_img_per_s.items():
            out[str(workers)][f"vs_gpu_batch{step_batch}"] = samples_per_s / img_per_s
        print(f"[loader] {workers} processes: {samples_per_s:.0f} samples/s", flush=True)
        del iterator, loader
    out["cpus"] = os.cpu_count()
    out["torch_threads"] = torch.get_num_threads()
    return out


# ------------------------------------------------------------------------------------------------------ main


def _settings(args) -> dict:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dry_run:
        return {
            "device": device,
            "backbone": "hrnet_w18_small",
            "input_hw": (128, 96),
            "batches": (2, 4),
            "steps": 2,
            "warmup": 1,
            "rounds": 1,
            "settle_s": 1.0,
            "loss_repeats": 2,
            "loader_workers": (1, 2),
            "loader_batch": 4,
            "loader_batches": 3,
            "peak_tflops": args.peak_tflops,
        }
    return {
        "device": device,
        "backbone": "hrnet_w32",
        "input_hw": (256, 192),
        "batches": (32, 64),
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "settle_s": 3.0,
        "loss_repeats": 20,
        "loader_workers": (4, 8, 16),
        "loader_batch": 32,
        "loader_batches": 30,
        "peak_tflops": args.peak_tflops,
    }


def _markdown(report: dict) -> str:
    lines = [f"Machine: {report['machine']}", ""]
    ratio = report.get("ratio")
    if isinstance(ratio, dict) and "error" not in ratio:
        lines += ["| batch | plain img/s | Ray Train img/s | ratio (goal >= 0.95) |", "|---|---|---|---|"]
        for batch, row in ratio.items():
            plain, ray = row["plain_img_per_s"], row["ray_img_per_s"]
            lines.append(f"| {batch} | {plain:.1f} | {ray:.1f} | {row['ratio']:.3f} |")
        lines.append("")
    loss = report.get("loss")
    if isinstance(loss, dict) and "error" not in loss:
        lines += [
            "| batch | fowkal loss fwd+bwd | ms | share of the plain step (goal <= 5%) |",
            "|---|---|---|---|",
        ]
        for batch, row in loss.items():
            for name, cell in row.items():
                if "error" in cell:
                    lines.append(f"| {batch} | {name} | failed: {cell['error']} | |")
                else:
                    share = "-" if cell["share_of_step"] is None else f"{100 * cell['share_of_step']:.2f}%"
                    lines.append(f"| {batch} | {name} | {cell['ms']:.2f} | {share} |")
        lines.append("")
    flops = report.get("flops")
    if isinstance(flops, dict) and "error" not in flops:
        lines += [f"| FLOPs | {report['settings']['backbone']} |", "|---|---|"]
        lines += [f"| {key} | {value:.4g} |" for key, value in flops.items()]
        lines.append("")
    loader = report.get("loader")
    if isinstance(loader, dict) and "error" not in loader:
        lines += ["| loader processes | samples/s | / GPU img/s per batch size |", "|---|---|---|"]
        for workers, row in loader.items():
            if isinstance(row, dict):
                versus = ", ".join(f"{k[7:]}: {v:.2f}" for k, v in row.items() if k.startswith("vs_gpu_"))
                lines.append(f"| {workers} | {row['samples_per_s']:.0f} | {versus} |")
        lines.append("")
    for section, value in report.items():
        if isinstance(value, dict) and "error" in value:
            lines.append(f"- {section}: FAILED: {value['error']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="directory for gpu_bench.json / .md")
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny sizes: the whole path in minutes on a CPU"
    )
    parser.add_argument(
        "--sections", nargs="+", default=["ratio", "loss", "flops", "loader"], help="which to run, in order"
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (cuDNN autotuning)")
    parser.add_argument("--rounds", type=int, default=2, help="plain/Ray pairs in ABBA order per batch size")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="dense bf16 peak to compare with")
    args = parser.parse_args(argv)
    unknown = set(args.sections) - {"ratio", "loss", "flops", "loader"}
    if unknown:
        parser.error(f"unknown --sections {sorted(unknown)}; choose from ratio, loss, flops, loader")

    import torch

    # Ray Train workers import this file's step (and trainer/) by module name.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    torch.backends.cudnn.benchmark = True
    settings = _settings(args)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    report: dict = {
        "machine": f"{platform.node()}: {gpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}, Python {platform.python_version()}"
        + (" (DRY RUN: figures meaningless)" if args.dry_run else ""),
        "settings": settings,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    print(report["machine"], flush=True)
    step_img_per_s: dict = {}
    for section in args.sections:
        started = time.perf_counter()
        try:
            if section == "ratio":
                report["ratio"] = section_ratio(settings)
                step_img_per_s = {b: row["plain_img_per_s"] for b, row in report["ratio"].items()}
            elif section == "loss":
                report["loss"] = section_loss(settings, step_img_per_s)
            elif section == "flops":
                report["flops"] = section_flops(settings, step_img_per_s)
            else:
                report["loader"] = section_loader(settings, step_img_per_s)
        except Exception as error:  # one broken section must not lose the others' figures
            traceback.print_exc()
            report[section] = {"error": f"{type(error).__name__}: {error}"}
        report.setdefault("seconds", {})[section] = time.perf_counter() - started
        (args.out / "gpu_bench.json").write_text(json.dumps(report, indent=2, default=str))
    markdown = _markdown(report)
    (args.out / "gpu_bench.md").write_text(markdown)
    print(markdown, flush=True)
    return 1 if any(isinstance(v, dict) and "error" in v for v in report.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
