"""What a ``fowkal`` command prints when it stops on an error: one line, or a traceback.

An error that names a user's file, key or value (a config key, an annotation, an image, a checkpoint, a run
name, a storage URI, a tracking server) is the user's to fix: ``fowkal <command>: <message>`` on one line and
exit status 2. Anything else is a bug and keeps its traceback; ``FOWKAL_DEBUG=1`` shows the traceback of
every error. The known ends of a command that are not errors of the input (an interrupt, a sweep whose
trials all failed, a record left incomplete by a tracking outage) are one line too, with their own status.

Errors raised inside Ray come back wrapped (Ray's ``RayTaskError`` keeps the original as ``cause``; Ray
Train's ``WorkerGroupError`` keeps each worker's in ``worker_failures``, wrapped once more with its traceback
text; ``ControllerError`` keeps ``controller_failure``): :func:`user_error_in` looks through the wrappers,
so a ``DatasetError`` raised in a training worker still ends ``fowkal train`` with its own message.
"""

from __future__ import annotations

import os
import re
import sys
import traceback

DEBUG_ENV = "FOWKAL_DEBUG"
USER_ERROR_EXIT = 2


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exception types whose message names the user's input (imported here, when an error is seen, so
    that ``fowkal --help`` imports none of their modules)."""
    from orchestrator.evaluation.tune_eval_inputs import TuneEvalError
    from orchestrator.reports.records import ReportError
    from orchestrator.sweeps.definition_file import SearchSpaceError
    from orchestrator.sweeps.settings import SweepError
    from orchestrator.tracking import TrackingServerError, TrackingStoreError
    from trainer.checkpoint import EvalError  # checkpoints (CheckpointMismatchError), runs, eval arguments
    from trainer.config import ConfigError
    from trainer.datasets.annotations import DatasetError  # annotations; images (ImageFileError)
    from trainer.families import FAMILIES, UnknownFamilyError
    from trainer.preflight import InputFileError  # the config's files; storage URIs (StorageError)
    from trainer.pretrained import PretrainedWeightsError

    return (
        ConfigError,
        DatasetError,
        EvalError,
        InputFileError,
        PretrainedWeightsError,
        ReportError,
        SearchSpaceError,
        SweepError,
        TrackingServerError,
        TrackingStoreError,
        TuneEvalError,
        UnknownFamilyError,
        *(error for family in FAMILIES.values() for error in family.setting_errors),
    )


def outcome_exit_codes() -> dict[type[BaseException], int]:
    """The ends of a command that are one line with their own exit status (not user errors, not bugs)."""
    from orchestrator.evaluation.tune_eval import TuneEvalFailed
    from orchestrator.runs.train import TrackingIncomplete, TrainingInterrupted
    from orchestrator.sweeps.sweep import SweepFailed, SweepInterrupted

    return {
        TrainingInterrupted: 130,
        SweepInterrupted: 130,
        KeyboardInterrupt: 130,
        SweepFailed: 1,
        TuneEvalFailed: 1,
        TrackingIncomplete: 1,  # trained; running the same command again completes the MLflow record
    }


def _wrapped(error: BaseException) -> list[BaseException]:
    """The exceptions ``error`` carries: its cause and context, and what Ray's wrappers keep."""
    inner = [error.__cause__, error.__context__]
    inner.append(getattr(error, "cause", None))  # ray.exceptions.RayTaskError
    inner.append(getattr(error, "controller_failure", None))  # ray.train.ControllerError
    inner.append(getattr(error, "_base_exc", None))  # Ray Train's UserExceptionWithTraceback
    failures = getattr(error, "worker_failures", None)  # ray.train.WorkerGroupError: rank -> exception
    if isinstance(failures, dict):
        inner.extend(failures.values())
    return [e for e in inner if isinstance(e, BaseException)]


def user_error_in(error: BaseException) -> BaseException | None:
    """``error`` if it is a user error, else the first user error it wraps (breadth first), else None."""
    kinds = user_error_types()
    seen: set[int] = set()
    queue = [error]
    while queue:
        current = queue.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, kinds):
            return current
        queue.extend(_wrapped(current))
    return None


# The line of a traceback text that holds the exception: ``module.Type: message``.
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(?:Error|Exception): (?P<message>\S.*)$")


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line. A DataLoader worker re-raises an error with the worker's
    traceback as its text ("Caught DatasetError in DataLoader worker process 0. Original Traceback ..."):
    then the original message, from the traceback's last exception line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if any(line.startswith("Traceback") or "Original Traceback" in line for line in lines):
        quoted = [m.group("message") for m in map(_EXCEPTION_LINE.match, lines) if m is not None]
        if quoted:
            return quoted[-1]
    return " ".join(lines) or type(error).__name__


def report_error(command: str, error: BaseException, stderr=None) -> int | None:
    """Print how ``fowkal <command>`` ended on ``error`` and return its exit status; None for a bug (the
    caller re-raises it: a traceback).

    A user error (or one wrapped in Ray's exceptions): one line, status 2. A known end
    (:func:`outcome_exit_codes`): one line, its status. With ``FOWKAL_DEBUG=1`` the traceback comes first.
    """
    stderr = stderr if stderr is not None else sys.stderr
    found = user_error_in(error)
    status = USER_ERROR_EXIT
    if found is None:
        codes = outcome_exit_codes()
        status = next((code for kind, code in codes.items() if isinstance(error, kind)), None)
        if status is None:
            return None
        found = error
    if os.environ.get(DEBUG_ENV, "").strip() not in ("", "0"):
        traceback.print_exception(type(error), error, error.__traceback__, file=stderr)
    message = "interrupted" if isinstance(found, KeyboardInterrupt) and not str(found) else one_line(found)
    print(f"fowkal {command}: {message}", file=stderr)
    return status


__all__ = ["DEBUG_ENV", "one_line", "report_error", "user_error_in", "user_error_types"]
