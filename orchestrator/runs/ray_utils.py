"""Connecting to Ray: an existing cluster when one is named, else a local Ray sized for this machine."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from collections.abc import Callable
from functools import partial

# A Train V2 run needs one CPU per worker (the controller takes none), and a sweep also runs one
# driver-side trial function per trial. On a 2-core laptop that would not fit two workers plus a trial, so the
# local Ray advertises at least this many logical CPUs; the workers then share the real cores, which is what
# a user on a small machine wants (slower, but it runs).
MIN_LOCAL_LOGICAL_CPUS = 4
# Ray's single-node mode (its default on macOS and Windows): the node's address is the loopback address, so
# every server it starts (GCS, raylet, object manager, workers, agents) listens on loopback only. Without it
# a local Ray on Linux listens on every interface of the machine.
_SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


# Ray's head node takes its GCS port from this variable when ray.init names none (ray._private.node).
_GCS_PORT_ENV = "RAY_GCS_SERVER_PORT"
# Where every Ray process that does not know its cluster looks for it (ray._private.services).
_RAY_ADDRESS_ENV = "RAY_ADDRESS"
# How often a Ray Train controller polls its workers (Ray's default 2 s). A worker's report waits for that
# poll (its result queue holds one), so on a local Ray, where epochs of the embedded default take well under
# a second, every epoch took at least 2 s; 0.5 s there. A missed poll is no failure (Ray marks a worker dead
# after 10 minutes of them), and a cluster keeps Ray's default, or the user's own setting of the variable.
TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
LOCAL_TRAIN_POLL_S = "0.5"
# What init_ray changed for a local Ray (environment variables, Ray's cluster switch), as undo steps that
# shutdown_ray runs last-first: a later Ray in the same process (a multi-node ``ray.cluster_utils.Cluster``,
# a `ray start` it spawns, another cluster's address) must not inherit them.
_undo: list[Callable[[], None]] = []


def _set_cluster_switch(value: object) -> object:
    """Set Ray's already-imported ENABLE_RAY_CLUSTER constant; return what it was (None without one)."""
    try:  # this process may have imported Ray already: its constant was read then
        from ray._private import ray_constants

        previous = ray_constants.ENABLE_RAY_CLUSTER
        ray_constants.ENABLE_RAY_CLUSTER = value
        return previous
    except (ImportError, AttributeError):  # pragma: no cover - a Ray without the switch
        return None


def _put_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _set_env_until_shutdown(name: str, value: str) -> None:
    _undo.append(partial(_put_env, name, os.environ.get(name)))
    os.environ[name] = value


def _single_node_mode() -> None:
    """Put Ray in single-node (loopback-only) mode for a local instance started by this process, until
    ``shutdown_ray``."""
    _set_env_until_shutdown(_SINGLE_NODE_ENV, "0")  # the processes Ray starts read it at their import
    previous_switch = _set_cluster_switch(False)
    if previous_switch is not None:
        _undo.append(partial(_set_cluster_switch, previous_switch))


def _undo_local_settings() -> None:
    while _undo:
        _undo.pop()()


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _address_own_cluster() -> str:
    """Choose the GCS address of the local Ray about to start and put it in ``RAY_ADDRESS`` (until
    ``shutdown_ray``), so that this process and every process the local Ray starts inherit it.

    Ray's own actors that look their cluster up by themselves (Train V2's PlacementGroupCleaner asks the
    State API, which resolves ``RAY_ADDRESS``, else the only Ray running on the machine) would otherwise find
    another command's local Ray too and fail with "Found multiple active Ray instances". The address must be
    known before ``ray.init``: the raylet copies this process's environment when it starts, and the workers
    copy the raylet's. ``ray.init(address="local")`` itself ignores ``RAY_ADDRESS``."""
    address = f"127.0.0.1:{_free_loopback_port()}"  # single-node mode: the GCS listens on loopback
    _set_env_until_shutdown(_GCS_PORT_ENV, address.rpartition(":")[2])
    _set_env_until_shutdown(_RAY_ADDRESS_ENV, address)
    return address


def local_logical_cpus(num_cpus: int | None = None) -> int:
    """Logical CPUs for a local Ray: ``num_cpus`` when given, else max(cores, MIN_LOCAL_LOGICAL_CPUS)."""
    if num_cpus is not None:
        if int(num_cpus) < 1:
            raise ValueError(f"num_cpus must be >= 1, got {num_cpus!r}")
        return int(num_cpus)
    return max(os.cpu_count() or 1, MIN_LOCAL_LOGICAL_CPUS)


def init_ray(address: str | None = None, num_cpus: int | None = None, log_to_driver: bool = True) -> dict:
    """Connect to Ray, or start a local one, and return ``ray.cluster_resources()``.

    - ``address`` (or ``RAY_ADDRESS``, set by ``ray job submit`` for the entrypoint) given: connect to that
      cluster; ``num_cpus`` is then ignored because a cluster's size is its own.
    - Neither: start a local Ray with ``local_logical_cpus(num_cpus)`` logical CPUs in single-node mode:
      every server it starts listens on loopback only, the dashboard on 127.0.0.1 (never exposed on the
      network). Its address is in ``RAY_ADDRESS`` until ``shutdown_ray``, for this process and every
      process the local Ray starts, so that two commands on one machine each reach their own Ray.

    ``log_to_driver=False`` keeps the workers' output off this process's console (a sweep's trials log
    to their own ``train.log``). Calling it again in a process where Ray is already up is a no-op.
    """
    import ray

    if ray.is_initialized():
        return ray.cluster_resources()
    _undo_local_settings()  # a local Ray of ours stopped by a bare ray.shutdown(): its settings are no one's
    target = address or os.environ.get("RAY_ADDRESS") or None
    if target:
        ray.init(address=target, log_to_driver=log_to_driver)
    else:
        # address="local": always a new instance; a bare ray.init() would join any `ray start` cluster
        # already running on this machine.
        _single_node_mode()
        expected = _address_own_cluster()
        _set_env_until_shutdown(TRAIN_POLL_ENV, os.environ.get(TRAIN_POLL_ENV, LOCAL_TRAIN_POLL_S))
        try:
            ray.init(
                address="local",
                num_cpus=local_logical_cpus(num_cpus),
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                log_to_driver=log_to_driver,
            )
        except BaseException:
            _undo_local_settings()
            raise
        actual = ray.get_runtime_context().gcs_address
        if actual != expected:  # pragma: no cover - Ray chose otherwise: this process at least knows
            os.environ[_RAY_ADDRESS_ENV] = actual
    return ray.cluster_resources()


@contextlib.contextmanager
def tune_signal_handlers():
    """Run a ``Tuner.fit()`` and give SIGINT/SIGTERM back their handlers afterwards: Tune installs its own
    (a Ctrl-C stops the experiment) and leaves them behind, so a later ``fowkal train`` in the same process
    would have its interrupt swallowed."""
    on_main_thread = threading.current_thread() is threading.main_thread()
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)} if on_main_thread else {}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def shutdown_ray() -> None:
    """Disconnect from (and, for a local Ray started here, stop) Ray if it is up; leave single-node mode."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    _undo_local_settings()
