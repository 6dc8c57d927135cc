"""The local Ray that fowkal starts listens on loopback only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


@pytest.mark.slow
def test_local_ray_servers_listen_on_loopback_only():
    code = textwrap.dedent(
        """
        import json, os, time
        import psutil
        import ray.train  # imported first, as fowkal's modules do, before the local Ray starts
        from orchestrator.runs.ray_utils import init_ray, shutdown_ray

        init_ray(num_cpus=2)

        @ray.remote
        class Echo:
            def pid(self):
                return os.getpid()

            def env(self, name):
                return os.environ.get(name)

        actor = Echo.remote()
        ray.get(actor.pid.remote())
        poll = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
        poll_in_actor = ray.get(actor.env.remote(poll))
        ray.get(ray.remote(lambda: os.getpid()).remote())
        time.sleep(2)
        me = psutil.Process()
        listening = []
        for proc in [me, *me.children(recursive=True)]:
            try:
                for conn in proc.net_connections(kind="inet"):
                    if conn.status == psutil.CONN_LISTEN:
                        listening.append([proc.name(), conn.laddr.ip, conn.laddr.port])
            except psutil.Error:
                pass
        shutdown_ray()
        print(json.dumps({"listening": listening, "poll": [poll_in_actor, os.environ.get(poll)]}))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    env.pop("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", None)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    # Ray Train controllers of a local Ray (actors like this one) poll their workers every 0.5 s; the
    # setting ends with the local Ray.
    assert found["poll"] == ["0.5", None]
    listening = found["listening"]
    names = {name for name, _, _ in listening}
    assert {"gcs_server", "raylet"} <= names, listening  # the check saw Ray's own servers
    exposed = [entry for entry in listening if entry[1] not in LOOPBACK]
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_tune_signal_handlers_gives_the_handlers_back():
    import signal

    from orchestrator.runs.ray_utils import tune_signal_handlers

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with tune_signal_handlers():
        signal.signal(signal.SIGINT, lambda *_: None)  # what Tune's fit() leaves behind
        signal.signal(signal.SIGTERM, lambda *_: None)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_shutdown_leaves_single_node_mode(monkeypatch):
    """A later multi-node Ray in the same process (ray.cluster_utils.Cluster) must not inherit it."""
    from ray._private import ray_constants

    from orchestrator.runs import ray_utils

    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    ray_utils._single_node_mode()
    assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert ray_constants.ENABLE_RAY_CLUSTER is False
    ray_utils.shutdown_ray()
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ
    assert ray_constants.ENABLE_RAY_CLUSTER is True
