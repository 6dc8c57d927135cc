"""The sweep's controller ledger: a named Ray actor, owned by the sweep's driver, that knows which Ray Train
controller runs which trial, which trials the driver aborted and which trials' training failed.

Why: Tune stops a trial by terminating its actor. The Train controller that actor created dies with it, but
the workers' placement group is scoped to the *job* (the sweep driver) and stays reserved; Ray Train's own
cleaner finds dead controllers through the State API, which cannot be relied on (e.g. it fails when several
Ray instances run on one machine). So each trial's controller registers itself (:class:`ControllerRegistrar`)
and the driver aborts it (:func:`abort_trial_controller`) before Tune ends the trial, releasing the workers
and their placement group the way Ctrl-C does in ``fowkal train``. And a trial whose training failed is
marked here, so that Tune's restart of it fails at once instead of training it again.

The functions below take the sweep's plan (``orchestrator.sweeps.trial.SweepPlan``; only its ``ledger_name``
is
read) and never raise: without the ledger a trial still trains, only the clean-up is lost.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from ray.train import UserCallback

from orchestrator import tracking

logger = logging.getLogger(__name__)


def ledger_name(sweep_id: str) -> str:
    """The name of a sweep's :class:`ControllerLedger` actor."""
    return f"fowkal-ledger-{sweep_id}"


class ControllerLedger:
    """The sweep-wide actor (see the module docstring); the sweep's driver makes it a named Ray actor
    (``ray.remote(ControllerLedger)``), tests use it as it is."""

    def __init__(self):
        self._controllers: dict[str, Any] = {}
        self._aborted: set[str] = set()
        self._failed: dict[str, str] = {}

    def mark_failed(self, trial_id: str, error: str) -> None:
        """The trial's training failed (not its actor): a restart of it by Tune fails at once."""
        self._failed[trial_id] = error

    def failure(self, trial_id: str) -> str | None:
        return self._failed.get(trial_id)

    def register(self, trial_id: str, controller) -> None:
        self._controllers[trial_id] = controller

    def was_aborted(self, trial_id: str) -> bool:
        return trial_id in self._aborted

    def abort(self, trial_id: str, timeout_s: float = 120.0) -> bool:
        """Abort the trial's Train controller (graceful: workers stopped, placement group removed).

        Returns True if a live controller was aborted, False if there was none or it had already exited.
        """
        import ray

        controller = self._controllers.pop(trial_id, None)
        if controller is None:
            return False
        self._aborted.add(trial_id)
        try:
            ray.get(controller.abort.remote(), timeout=timeout_s)
        except ray.exceptions.RayActorError:
            pass  # abort() ends with exit_actor(): the call "fails" once the controller is gone
        except ray.exceptions.GetTimeoutError:
            ray.kill(controller)
        return True


class ControllerRegistrar(UserCallback):
    """Ray Train ``UserCallback`` that registers its controller with the sweep's ledger at the first report.

    Runs on the Train controller; ``ray.get_runtime_context().current_actor`` is the controller itself.
    """

    def __init__(self, ledger_name: str, trial_id: str):
        self.ledger_name = ledger_name
        self.trial_id = trial_id
        self._registered = False

    def after_report(self, run_context, metrics, checkpoint):
        if self._registered:
            return
        try:
            import ray

            ledger = ray.get_actor(self.ledger_name)
            controller = ray.get_runtime_context().current_actor
            ray.get(ledger.register.remote(self.trial_id, controller), timeout=60)
            self._registered = True
        except Exception as err:  # without it only the early stop leaks resources; training goes on
            logger.warning("could not register trial %s with %s: %s", self.trial_id, self.ledger_name, err)

    def after_exception(self, run_context, worker_exceptions):
        pass


def record_failure(plan, trial_id: str, err: BaseException) -> None:
    """Mark the trial's training as failed in the ledger (its error in one line, at most 2000 characters)."""
    try:
        import ray

        text = tracking.error_summary(err)
        ray.get(ray.get_actor(plan.ledger_name).mark_failed.remote(trial_id, text[:2000]), timeout=30)
    except Exception as record_err:  # without it a Tune restart trains the failing trial once more
        logger.warning("could not record the failure of trial %s: %s", trial_id, record_err)


def earlier_failure(plan, trial_id: str) -> str | None:
    """The error of the trial's failed training earlier in this sweep, or None."""
    try:
        import ray

        return ray.get(ray.get_actor(plan.ledger_name).failure.remote(trial_id), timeout=30)
    except Exception:
        return None


def was_aborted(plan, trial_id: str) -> bool:
    """Whether the driver aborted the trial's Train run (the scheduler stopped the trial)."""
    try:
        import ray

        return bool(ray.get(ray.get_actor(plan.ledger_name).was_aborted.remote(trial_id), timeout=30))
    except Exception:
        return False


def abort_trial_controller(plan, trial_id: str) -> None:
    """Abort the trial's Train run through the ledger (a no-op once its controller is gone)."""
    try:
        import ray

        ledger = ray.get_actor(plan.ledger_name)
        ray.get(ledger.abort.remote(trial_id), timeout=180)
    except Exception as err:
        logger.warning("could not abort the Train run of trial %s: %s", trial_id, err)


@contextlib.contextmanager
def controller_ledger(plan):
    """The sweep's :class:`ControllerLedger` actor, held until the sweep ends (a named actor is kept alive by
    its owner's handle); killed when the Tuner returns."""
    import ray

    ledger = (
        ray.remote(ControllerLedger)
        .options(name=plan.ledger_name, num_cpus=0, max_concurrency=8, get_if_exists=True)
        .remote()
    )
    yield ledger
    ray.kill(ledger)


__all__ = [
    "controller_ledger",
    "ControllerLedger",
    "ControllerRegistrar",
    "abort_trial_controller",
    "earlier_failure",
    "ledger_name",
    "record_failure",
    "was_aborted",
]
