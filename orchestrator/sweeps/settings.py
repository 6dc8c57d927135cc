"""The settings of one ``fowkal tune`` / ``fowkal ablate`` run besides its training config: one object.

``SweepSettings`` is built by the CLI from its flags (each flag's default is the field's default here, and
``--help`` shows it) and passed whole to ``orchestrator.sweeps.sweep.run_sweep``, which hands the parts the
trials
need to Tune through ``orchestrator.sweeps.trial.SweepPlan``.

The sweep's identity, its default name and so what ``--resume`` (or re-running the command) finds again,
is :meth:`SweepSettings.identity` together with the base config and the definition file's text: only what
defines the experiment. For a sweep that is the search-space file, the TPE seed and ASHA's grace period and
reduction factor; for an ablation the arms file and the seeds. The trial budget (``--samples``), the
concurrency, the GPUs per trial, the tracking store, the storage path, the cluster address and
``max_failures`` do not change it: a sweep resumed with another ``--samples`` is the same sweep (Tune keeps
the trial count it started with).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from orchestrator.sweeps.kinds import SWEEP_KIND_OBJECTS, SWEEP_KINDS, SweepKind, get_sweep_kind

DEFAULT_EXPERIMENTS = {name: kind.default_experiment for name, kind in SWEEP_KIND_OBJECTS.items()}


class SweepError(ValueError):
    """Invalid sweep or ablation settings (names the flag or file and the value)."""


@dataclass
class SweepSettings:
    """Every setting of a sweep (``kind="tune"``) or an ablation (``kind="ablate"``) but the config."""

    kind: str = "tune"
    space_path: str | os.PathLike | None = None  # --space: search-space YAML (tune)
    arms_path: str | os.PathLike | None = None  # --arms: ablation arms YAML (ablate)
    samples: int = 20  # --samples: Tune trials (the space's points to evaluate come first)
    seeds: int = 1  # --seeds: seeds per arm: config seed, seed + 1, ...
    max_concurrent: int | None = None  # --max-concurrent: cap; the cluster's resources give the number
    gpus_per_trial: float | None = None  # --gpus-per-trial: None = num_workers if use_gpu, else 0
    grace_period: int = 1  # --grace-period: ASHA, epochs before a trial can be stopped
    reduction_factor: int = 2  # --reduction-factor: ASHA keeps 1/this at each rung
    search_seed: int = 0  # --seed: seed of Optuna's TPE sampler
    resume: bool = False  # --resume: insist on continuing (re-running the same command continues anyway)
    fresh: bool = False  # --fresh / --no-resume: start a new sweep (a time-stamped name) instead
    restart_errored: bool = False  # --restart-errored: with --resume, run errored trials again
    tracking_uri: str | None = None  # --tracking-uri: default MLFLOW_TRACKING_URI, else output_dir/mlflow.db
    experiment_name: str | None = None  # --experiment: default fowkal-tune / fowkal-ablate
    name: str | None = None  # --name: default <config name>-<kind>-<8 hex of the identity>
    storage_path: str | os.PathLike | None = None  # --storage-path: default <output_dir>/sweeps
    address: str | None = None  # --address: default RAY_ADDRESS, else a new local Ray
    num_cpus: int | None = None  # logical CPUs of a local Ray (orchestrator.runs.ray_utils.init_ray)
    verbose: int = 1  # 0 = no progress table (--quiet)

    @property
    def sweep_kind(self) -> SweepKind:
        """What differs between the kinds of sweep (``orchestrator.sweeps.kinds``); an unknown ``kind`` is a
        :class:`SweepError`."""
        try:
            return get_sweep_kind(self.kind)
        except ValueError as err:
            raise SweepError(str(err)) from None

    @property
    def definition_path(self) -> str | os.PathLike | None:
        """The file that defines the trials: the search space or the arms."""
        return getattr(self, self.sweep_kind.definition_field)

    @property
    def experiment(self) -> str:
        return self.experiment_name or self.sweep_kind.default_experiment

    def identity(self) -> dict[str, Any]:
        """The settings that define the experiment (see the module docstring)."""
        return {name: getattr(self, name) for name in self.sweep_kind.identity_fields}

    def validate(self, epochs: int) -> None:
        """Raise :class:`SweepError` naming the flag of the first setting that cannot work."""
        kind = self.sweep_kind  # an unknown kind first
        if self.definition_path is None:
            raise SweepError(f"fowkal {self.kind} needs {kind.definition_flag} FILE")
        budget = getattr(self, kind.budget_field)
        if not _is_int(budget) or budget < 1:
            raise SweepError(f"{kind.budget_flag} must be a positive integer, got {budget!r}")
        for flag, value, low in (
            ("--grace-period", self.grace_period, 1),
            ("--reduction-factor", self.reduction_factor, 2),
        ):
            if not _is_int(value) or value < low:
                raise SweepError(f"{flag} must be an integer >= {low}, got {value!r}")
        if kind.early_stopping and self.grace_period >= epochs:
            raise SweepError(
                f"--grace-period ({self.grace_period}) must be below the config's epochs ({epochs}): "
                "ASHA would never stop a trial"
            )
        if self.gpus_per_trial is not None and (
            not isinstance(self.gpus_per_trial, int | float) or self.gpus_per_trial < 0
        ):
            raise SweepError(f"--gpus-per-trial must be >= 0, got {self.gpus_per_trial!r}")
        if self.max_concurrent is not None and (not _is_int(self.max_concurrent) or self.max_concurrent < 1):
            raise SweepError(f"--max-concurrent must be >= 1, got {self.max_concurrent!r}")

    def replace(self, **changes: Any) -> SweepSettings:
        """A copy with ``changes``; an unknown field is a ``TypeError`` naming it."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"unknown sweep settings {unknown} (SweepSettings fields: {sorted(known)})")
        return dataclasses.replace(self, **changes)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


__all__ = ["DEFAULT_EXPERIMENTS", "SWEEP_KINDS", "SweepError", "SweepSettings"]
