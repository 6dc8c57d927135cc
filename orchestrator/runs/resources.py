"""Resource arithmetic of sweeps: what one trial holds and how many trials fit the cluster at once.

A training trial holds ``TRIAL_CPUS`` itself (it only waits on its Train controller) and its Ray Train workers
take their own placement group, so the number of concurrent trials is derived from the cluster: Tune never
starts more trials than the cluster can also place the workers of, so no trial waits forever. A
``fowkal tune-eval`` trial has no workers and holds ``EVAL_TRIAL_CPUS`` itself.
"""

from __future__ import annotations

import math

from orchestrator.sweeps.settings import SweepError

# CPUs a training trial's function itself holds (fowkal tune / ablate). Fractional so that on a GPU cluster
# the CPUs left over after the workers still fit a trial per GPU.
TRIAL_CPUS = 0.5
# CPUs a fowkal tune-eval trial holds: it has no workers and does the work itself, one decode + one
# xtcocotools evaluation at a time.
EVAL_TRIAL_CPUS = 1.0
# Ray Train's default per worker (ScalingConfig.resources_per_worker) when none is given.
CPUS_PER_WORKER = 1.0


def derive_max_concurrent(
    cluster_resources: dict,
    *,
    num_workers: int,
    gpus_per_trial: float,
    requested: int | None = None,
    trial_cpus: float = TRIAL_CPUS,
) -> int:
    """How many trials can run at once so that every one can also place its Ray Train workers.

    A trial needs ``trial_cpus + num_workers x CPUS_PER_WORKER`` CPUs and ``gpus_per_trial`` GPUs; the result
    is the number of such trials the cluster holds, capped by ``requested`` (``--max-concurrent``).

    Raises:
        SweepError: not even one trial fits, or ``requested`` < 1.
    """
    if requested is not None and requested < 1:
        raise SweepError(f"--max-concurrent must be >= 1, got {requested!r}")
    cpus = float(cluster_resources.get("CPU", 0.0))
    gpus = float(cluster_resources.get("GPU", 0.0))
    cpu_per_trial = trial_cpus + num_workers * CPUS_PER_WORKER
    fits = math.floor(cpus / cpu_per_trial + 1e-9)
    if gpus_per_trial > 0:
        fits = min(fits, math.floor(gpus / gpus_per_trial + 1e-9))
    if fits < 1 and num_workers == 0:  # a trial without workers (tune-eval): nothing to lower
        raise SweepError(
            f"one trial needs {trial_cpus:g} CPU and {gpus_per_trial:g} GPU, but the cluster has "
            f"{cpus:g} CPU and {gpus:g} GPU"
        )
    if fits < 1:
        raise SweepError(
            f"one trial needs {cpu_per_trial:g} CPU ({num_workers} worker(s) x {CPUS_PER_WORKER:g} + "
            f"{trial_cpus:g} for the trial) and {gpus_per_trial:g} GPU, but the cluster has {cpus:g} CPU "
            f"and {gpus:g} GPU: lower num_workers (--set num_workers=1) or --gpus-per-trial"
        )
    return min(fits, requested) if requested is not None else fits


def scaling_config(cfg, gpus_per_trial: float | None = None):
    """``ray.train.ScalingConfig`` of a run: ``cfg.num_workers`` workers; with ``gpus_per_trial`` (a sweep's
    trial) the trial's GPUs are split over its workers, else (``fowkal train``) one GPU each if use_gpu."""
    from ray.train import ScalingConfig

    if gpus_per_trial is None:
        return ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu)
    if gpus_per_trial > 0:
        return ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=True,
            resources_per_worker={"CPU": CPUS_PER_WORKER, "GPU": gpus_per_trial / cfg.num_workers},
        )
    return ScalingConfig(num_workers=cfg.num_workers, use_gpu=False)


__all__ = ["CPUS_PER_WORKER", "EVAL_TRIAL_CPUS", "TRIAL_CPUS", "derive_max_concurrent", "scaling_config"]
