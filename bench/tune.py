"""Sweep throughput: per-trial overhead (trial start to first training step) and trials per hour.

    .venv/bin/python bench/tune.py            # smoke config, 4 ablation arms x 1 seed, 2 epochs per trial
    .venv/bin/python bench/tune.py --quick    # 2 arms, 1 epoch, 64 training images (~2-3 min)

The sweep is `fowkal ablate` (FIFO scheduler: every trial trains all its epochs, so trials per hour is not
flattered by early stopping) on configs/smoke.yaml with its synthetic data. A driver-side Tune callback
records, per trial, when Tune starts it and when its first result arrives; the first result carries the
epoch's own duration (``time/epoch_s``, measured by the training loop from the epoch's first batch), so

    overhead = (first result) - (epoch 1 duration) - (trial start)

is everything before the first training step: the trial actor, the MLflow child run, the Ray Train
controller and worker group, data set and model construction. The baseline, measured in the same run
before Ray starts, is the same config trained by a plain in-process call of ``train_loop_per_worker`` with
one torch thread (what a 1-CPU Ray Train worker gets); the ratio sweep trial / plain run is the cost of
running a config as a sweep trial.

    .venv/bin/python bench/tune.py --compare-poll [--epochs 6]

runs the sweep twice in one run, first with Ray Train's own 2 s poll of its workers
(``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``), then with the local Ray's 0.5 s (``orchestrator.runs.ray_utils``): a
worker's report waits for the poll, so short epochs wait up to 2 s each.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _plain_run_seconds(config) -> float:
    """Wall time of one plain (no Ray, no MLflow) training run of ``config``, one torch thread."""
    import dataclasses

    import torch

    from trainer.loop import resolve_datasets, train_loop_per_worker

    resolve_datasets(config.data)  # generate the synthetic data outside the timing (the sweep reuses it)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory(prefix="fowkal_bench_plain_") as tmp:
            plain = dataclasses.replace(config, output_dir=tmp)
            start = time.perf_counter()
            train_loop_per_worker(plain)
            return time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)


def _timed_sweep(config, arms_file: Path, work: Path, max_concurrent, plain_seconds: float) -> None:
    """One timed ``fowkal ablate`` of ``arms_file`` on ``config`` (its own MLflow store under ``work``),
    printed; the local Ray it starts is stopped at the end."""
    import dataclasses

    from ray.tune import Callback

    from orchestrator.runs.ray_utils import shutdown_ray
    from orchestrator.sweeps.sweep import run_sweep

    config = dataclasses.replace(config, output_dir=str(work / "out"))

    class Timing(Callback):
        def __init__(self):
            self.started: dict[str, float] = {}
            self.first_result: dict[str, tuple[float, float]] = {}
            self.completed: dict[str, float] = {}

        def on_trial_start(self, iteration, trials, trial, **info):
            self.started[trial.trial_id] = time.time()

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if trial.trial_id not in self.first_result:
                self.first_result[trial.trial_id] = (time.time(), float(result.get("time/epoch_s", 0.0)))

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.completed[trial.trial_id] = time.time()

    timing = Timing()
    start = time.time()
    outcome = run_sweep(
        "ablate",
        config,
        arms_path=arms_file,
        seeds=1,
        max_concurrent=max_concurrent,
        tracking_uri=f"sqlite:///{work / 'mlflow.db'}",
        verbose=0,
        callbacks=[timing],
        print_fn=lambda line: None,
    )
    wall = time.time() - start
    overheads, trial_walls = [], []
    for trial_id, started in timing.started.items():
        if trial_id in timing.first_result:
            first, epoch_seconds = timing.first_result[trial_id]
            overheads.append(first - epoch_seconds - started)
        if trial_id in timing.completed:
            trial_walls.append(timing.completed[trial_id] - started)
    trials = len(timing.completed)
    print(f"sweep: {trials} trial(s), up to {outcome.max_concurrent} at once, {wall:.1f} s wall")
    if overheads:
        mean_overhead = statistics.fmean(overheads)
        print(
            f"  per-trial overhead (trial start -> first training step): mean {mean_overhead:.1f} s "
            f"(min {min(overheads):.1f}, max {max(overheads):.1f})"
        )
    if trial_walls:
        mean_trial = statistics.fmean(trial_walls)
        print(f"  trial wall time (start -> complete): mean {mean_trial:.1f} s")
        print(f"  ratio trial / plain run: {mean_trial / plain_seconds:.2f}x")
    print(f"  trials per hour: {3600 * trials / wall:.1f} (with {outcome.max_concurrent} concurrent)")
    print(f"  plain runs per hour, back to back on one core: {3600 / plain_seconds:.1f}")
    shutdown_ray()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2 arms, 1 epoch, 64 training images")
    parser.add_argument(
        "--arms", type=int, default=None, help="ablation arms to run (default 4, 2 with --quick)"
    )
    parser.add_argument(
        "--epochs", type=int, default=None, help="epochs per trial (default 2, 1 with --quick)"
    )
    parser.add_argument("--max-concurrent", type=int, default=None, help="cap on concurrent trials")
    parser.add_argument(
        "--compare-poll",
        action="store_true",
        help="the sweep with Ray Train's 2 s poll, then the local 0.5 s",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory (sweep, MLflow store)")
    args = parser.parse_args()

    from orchestrator.sweeps.ablation_arms import load_ablation_arms
    from trainer.config import load_config

    arms_count = args.arms or (2 if args.quick else 4)
    epochs = args.epochs or (1 if args.quick else 2)
    work = Path(tempfile.mkdtemp(prefix="fowkal_bench_tune_"))
    overrides = [f"epochs={epochs}", f"eval_interval={epochs}", f"output_dir={work / 'out'}"]
    overrides.append(f"data.synthetic_dir={REPO / 'data' / 'synthetic'}")
    if args.quick:
        overrides += ["data.synthetic_train_images=64", "data.synthetic_val_images=8"]
    config = load_config(REPO / "configs" / "smoke.yaml", overrides)
    all_arms = load_ablation_arms(REPO / "search_spaces" / "ablation_paper.yaml")
    arms_file = work / "arms.yaml"
    import yaml

    arms_file.write_text(
        yaml.safe_dump(
            {
                "arms": [
                    {
                        "key": a.key,
                        "name": a.name,
                        "label": a.label,
                        "table": a.table,
                        "overrides": a.overrides,
                        "paper": a.paper,
                    }
                    for a in all_arms[:arms_count]
                ]
            }
        )
    )
    print(
        f"smoke config, {arms_count} arm(s) x 1 seed, {epochs} epoch(s), "
        f"{config.data.synthetic_train_images} training images; work dir {work}"
    )

    print("baseline: one plain training run (no Ray, no MLflow, 1 torch thread) ...", flush=True)
    plain_seconds = _plain_run_seconds(load_config(REPO / "configs" / "smoke.yaml", overrides))
    print(f"  plain run: {plain_seconds:.1f} s")

    from orchestrator.runs.ray_utils import LOCAL_TRAIN_POLL_S, TRAIN_POLL_ENV

    polls = ["2.0", LOCAL_TRAIN_POLL_S] if args.compare_poll else [None]
    for poll in polls:
        if poll is not None:
            os.environ[TRAIN_POLL_ENV] = poll  # read by init_ray when the sweep starts its local Ray
            print(f"Ray Train poll {poll} s:")
        _timed_sweep(config, arms_file, work / f"poll-{poll}", args.max_concurrent, plain_seconds)
        if poll is not None:
            os.environ.pop(TRAIN_POLL_ENV, None)
    if args.keep:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
