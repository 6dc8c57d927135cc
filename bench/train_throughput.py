"""Training-step throughput: a plain PyTorch loop vs the same loop as a Ray Train worker, in one run.

    .venv/bin/python bench/train_throughput.py          # hrnet_w32, 256x192, batch 8 (the paper's model)
    .venv/bin/python bench/train_throughput.py --quick  # hrnet_w18_small, 128x96, batch 4 (~1 min)

Both measurements run the *same* function (`measure_steps`): build the model, warm up, then time forward +
MSE loss against target heatmaps + backward + Adam step on a fixed synthetic batch (so data loading is not
measured: the question is Ray Train's overhead on the step). Under Ray Train the model goes through
`ray.train.torch.prepare_model` (DDP only when more than one worker) and the worker uses the same number of
torch threads as the plain loop (Ray would otherwise set OMP_NUM_THREADS=1 for a 1-CPU actor, which measures
the thread count, not Ray). The goal is ratio = ray / plain >= 0.95.

Fair conditions: each measurement runs in a fresh process (the plain loop in a spawned subprocess with no Ray
running; the Ray Train worker is a fresh actor of a local Ray started for that measurement), and the two
alternate over ``--rounds`` rounds in ABBA order. Measured here: the same plain loop repeated inside one
process slows by 5-10% from one repetition to the next (allocator state), which an earlier version of
this bench, measuring the plain loop first in the driver and Ray Train last, counted against Ray.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def measure_steps(config: dict) -> dict:
    """Time ``config['steps']`` training steps after ``config['warmup']``; returns images/s and step times."""
    import torch

    from trainer.topdown.model import build_pose_model

    torch.manual_seed(0)
    torch.set_num_threads(int(config["threads"]))
    under_ray = bool(config.get("under_ray"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_pose_model(config["backbone"], with_kaf=False)
    if under_ray:
        import ray.train.torch

        model = ray.train.torch.prepare_model(model)
        device = ray.train.torch.get_device()
    else:
        model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    height, width = config["input_hw"]
    batch = int(config["batch"])
    images = torch.randn(batch, 3, height, width, device=device)
    targets = torch.rand(batch, 133, height // 4, width // 4, device=device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        heatmaps, _ = model(images)
        loss = torch.nn.functional.mse_loss(heatmaps, targets)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(int(config["warmup"])):
        step()
    times = []
    for _ in range(int(config["steps"])):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    median = sorted(times)[len(times) // 2]
    # The median step, not the mean: on a shared machine one step stalled by another process would otherwise
    # decide the figure.
    result = {
        "img_per_s": batch / median,
        "mean_img_per_s": batch * len(times) / sum(times),
        "median_step_s": median,
        "device": device.type,
        "threads": torch.get_num_threads(),
    }
    return result


def _ray_worker(config: dict) -> dict:
    # Train V2 keeps metrics only with checkpoints; the return value of rank 0 comes back as
    # ``Result.return_value``, which is all we need here.
    return measure_steps(config)


def measure_under_ray_train(config: dict, step_fn=_ray_worker, name: str = "bench-train") -> dict:
    """Run ``step_fn(config)`` (default ``measure_steps``; a module-level function, so that the worker can
    import it) as a one-worker Ray Train (V2) run of a local Ray started for it; return what it returned."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from orchestrator.runs.ray_utils import init_ray

    init_ray()
    use_gpu = config["device"] == "cuda"
    # One worker holding as many CPUs as the plain loop uses threads, so both compete for the same cores.
    resources = {"CPU": int(config["threads"])}
    if use_gpu:
        resources["GPU"] = 1
    with tempfile.TemporaryDirectory(prefix=f"fowkal_{name}_") as storage:
        trainer = TorchTrainer(
            step_fn,
            train_loop_config={**config, "under_ray": True},
            scaling_config=ScalingConfig(num_workers=1, use_gpu=use_gpu, resources_per_worker=resources),
            run_config=RunConfig(name=name, storage_path=storage),
        )
        result = trainer.fit()
    ray.shutdown()
    return dict(result.return_value)


def measure_plain_in_fresh_process(config: dict, step_fn=measure_steps) -> dict:
    """``step_fn(config)`` in a spawned interpreter: the fresh-process start the Ray Train worker gets."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(step_fn, (config,))


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else 0.5 * (ordered[middle - 1] + ordered[middle])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="hrnet_w18_small at 128x96, batch 4, few steps")
    parser.add_argument("--backbone", default=None, help="default hrnet_w32 (hrnet_w18_small with --quick)")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default 8, 4 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 8, 5 with --quick)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    parser.add_argument(
        "--rounds", type=int, default=None, help="plain/Ray Train pairs in ABBA order (default 4; 2 --quick)"
    )
    args = parser.parse_args(argv)

    import torch

    config = {
        "backbone": args.backbone or ("hrnet_w18_small" if args.quick else "hrnet_w32"),
        "input_hw": (128, 96) if args.quick else (256, 192),
        "batch": args.batch or (4 if args.quick else 8),
        "steps": args.steps or (5 if args.quick else 8),
        "warmup": args.warmup,
        "threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    rounds = args.rounds or (2 if args.quick else 4)
    if rounds < 1:
        parser.error(f"--rounds must be >= 1, got {rounds}")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    print(f"config: {config}, rounds: {rounds}")
    figures: dict[str, list[float]] = {"plain": [], "ray": []}
    for round_index in range(rounds):
        order = ("plain", "ray") if round_index % 2 == 0 else ("ray", "plain")
        for kind in order:
            measure = measure_plain_in_fresh_process if kind == "plain" else measure_under_ray_train
            result = measure(config)
            figures[kind].append(result["img_per_s"])
            label = "plain PyTorch loop " if kind == "plain" else "Ray Train, 1 worker"
            print(
                f"round {round_index + 1} {label}: {result['img_per_s']:.2f} img/s (median step "
                f"{result['median_step_s']:.3f} s, mean {result['mean_img_per_s']:.2f} img/s, "
                f"{result['threads']} threads)",
                flush=True,
            )
    plain, ray = _median(figures["plain"]), _median(figures["ray"])
    print(f"plain PyTorch loop : {plain:.2f} img/s (median of {rounds})")
    print(f"Ray Train, 1 worker: {ray:.2f} img/s (median of {rounds})")
    print(f"ratio ray/plain    : {ray / plain:.3f} (goal >= 0.95)")
    pair_ratios = [r / p for r, p in zip(figures["ray"], figures["plain"], strict=True)]
    print("ratio per round    : " + " ".join(f"{value:.3f}" for value in pair_ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
