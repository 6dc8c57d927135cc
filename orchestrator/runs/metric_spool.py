"""Per-epoch MLflow metrics that never block training and are never lost: a local spool and a sender thread.

Why not log directly from ``MlflowReportCallback.after_report``: Ray Train calls it on its controller, and a
blocking MLflow call there (the client's own retry loop during a server outage) stalls training; once the
client gives up, the values are gone. Instead:

- ``MetricSender.submit`` appends the values, with their step and the time they were reported, as one JSON
  line to the run's spool file ``<output_dir>/mlflow_spool/<run id>.jsonl`` (a local append: microseconds)
  and wakes the sender thread. Nothing else happens on the caller's thread.
- The sender thread delivers every record of the spool that has no acknowledgement yet, oldest first, with
  ``log_batch`` (original steps and timestamps), then appends an acknowledgement line. A failure leaves the
  records pending and retries with exponential backoff (``BACKOFF_INITIAL_S`` doubling to
  ``BACKOFF_MAX_S``); new values meanwhile only grow the spool (memory stays bounded).
- Any later process replays what is still pending (``deliver_pending``): ``fowkal train`` after ``fit()``,
  on ``--resume`` and on a re-run of the same command. Replays carry the original timestamps, and MLflow's
  stores keep one row per (key, timestamp, step, value): a value delivered twice (a reply lost after the
  server had stored it) is still stored once.
- Values delivered later than their first attempt are counted; the run's ``fowkal.replayed_values`` tag
  holds the total over the run's life.

One delivery at a time per spool (a ``flock`` on ``<spool>.lock``), so a driver replaying and a controller's
sender thread never interleave their acknowledgements.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

SPOOL_DIR = "mlflow_spool"
# The run's tag: how many metric values reached MLflow only by a replay (after a failed first attempt).
TAG_REPLAYED_VALUES = "fowkal.replayed_values"
BACKOFF_INITIAL_S = 1.0
BACKOFF_MAX_S = 30.0
# MLflow's log_batch takes at most 1000 metrics per request.
_METRICS_PER_BATCH = 1000
# A reachability probe of an HTTP tracking server (GET /health) gives up after this long.
PROBE_TIMEOUT_S = 5.0


def spool_path(spool_dir: str | os.PathLike, run_id: str) -> Path:
    """The spool file of ``run_id`` under ``spool_dir`` (the run's output directory)."""
    if not run_id or "/" in run_id or run_id.startswith("."):
        raise ValueError(f"run_id must be a plain MLflow run id, got {run_id!r}")
    return Path(spool_dir).expanduser().resolve() / SPOOL_DIR / f"{run_id}.jsonl"


@dataclass(frozen=True)
class SpoolRecord:
    """The values of one report: ``values`` at ``step``, reported at ``timestamp_ms``."""

    seq: str
    step: int
    timestamp_ms: int
    values: dict[str, float]


class MetricSpool:
    """The spool file: record lines ``{"seq", "step", "ts", "values"}`` and ack lines ``{"ack", "replayed"}``.

    Appends are single ``write`` calls of whole lines on an ``O_APPEND`` descriptor, so lines from two
    processes never mix; a torn last line (a process killed mid-write) is ignored when read.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._prefix = f"{os.getpid()}-{time.time_ns()}"
        self._count = 0

    def _append(self, entry: Mapping) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(entry, allow_nan=True) + "\n").encode()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":  # end a torn line so this one stays whole
                line = b"\n" + line
            os.write(fd, line)
        finally:
            os.close(fd)

    def append(self, values: Mapping[str, float], step: int, timestamp_ms: int | None = None) -> str:
        """Keep ``values`` at ``step``; returns the record's id."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        self._count += 1
        seq = f"{self._prefix}-{self._count}"
        ts = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
        self._append(
            {"seq": seq, "step": step, "ts": ts, "values": {str(k): float(v) for k, v in values.items()}}
        )
        return seq

    def acknowledge(self, seqs: list[str], replayed_values: int) -> None:
        """Mark records delivered; ``replayed_values`` of their values came by a replay."""
        self._append({"ack": list(seqs), "replayed": int(replayed_values)})

    def _lines(self) -> list[dict]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        entries = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except ValueError:
                logger.warning("%s:%d: unreadable spool line skipped", self.path, number)
        return entries

    def pending(self) -> list[SpoolRecord]:
        """Records without an acknowledgement, in the order they were reported."""
        records: dict[str, SpoolRecord] = {}
        acked: set[str] = set()
        for entry in self._lines():
            if "ack" in entry:
                acked.update(entry["ack"])
            elif "seq" in entry:
                records[entry["seq"]] = SpoolRecord(
                    entry["seq"], int(entry["step"]), int(entry["ts"]), dict(entry["values"])
                )
        return [record for seq, record in records.items() if seq not in acked]

    def replayed_total(self) -> int:
        """Values delivered by a replay over the spool's life."""
        return sum(int(entry.get("replayed", 0)) for entry in self._lines() if "ack" in entry)

    def pending_values(self) -> int:
        return sum(len(record.values) for record in self.pending())

    @contextmanager
    def delivery_lock(self):
        """One delivery at a time for this spool, across processes."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _metric(key: str, value: float, timestamp_ms: int, step: int):
    from mlflow.entities import Metric

    return Metric(key, value, timestamp_ms, step)


def deliver_pending(spool: MetricSpool, run_id: str, client, first_attempts: set[str] | None = None) -> int:
    """Send every pending record of ``spool`` to ``run_id``; returns the values sent.

    ``first_attempts`` holds ids of records never tried before (those are not counted as replayed); every
    other pending record (tried and failed, or left by an earlier process) is. Raises what the client
    raises; records sent before the failure stay acknowledged.
    """
    sent = 0
    with spool.delivery_lock():
        pending = spool.pending()
        if not pending:
            return 0
        replayed_before = spool.replayed_total()
        replayed_now = 0
        batch: list = []
        seqs: list[str] = []
        replayed_in_batch = 0

        def flush():
            nonlocal batch, seqs, replayed_in_batch, replayed_now, sent
            if not seqs:
                return
            if batch:
                client.log_batch(run_id, metrics=batch)
            spool.acknowledge(seqs, replayed_in_batch)
            sent += len(batch)
            replayed_now += replayed_in_batch
            batch, seqs, replayed_in_batch = [], [], 0

        for record in pending:
            fresh = first_attempts is not None and record.seq in first_attempts
            if first_attempts is not None:
                first_attempts.discard(record.seq)
            if len(batch) + len(record.values) > _METRICS_PER_BATCH:
                flush()
            batch.extend(_metric(k, v, record.timestamp_ms, record.step) for k, v in record.values.items())
            seqs.append(record.seq)
            if not fresh:
                replayed_in_batch += len(record.values)
        flush()
        if replayed_now:
            client.set_tag(run_id, TAG_REPLAYED_VALUES, str(replayed_before + replayed_now))
    return sent


class MetricSender:
    """Non-blocking metric logging for one run: ``submit`` spools, a daemon thread delivers.

    Args:
        tracking_uri, run_id: the MLflow run.
        spool_dir: the run's output directory (the spool lives in its ``mlflow_spool/``).
        client_factory: makes the MLflow client in the sender thread (default ``MlflowClient(tracking_uri)``).
        backoff_initial_s, backoff_max_s: retry delays after a failed delivery, doubling (default
            ``BACKOFF_INITIAL_S``, ``BACKOFF_MAX_S``).
    """

    def __init__(
        self,
        tracking_uri: str,
        run_id: str,
        spool_dir: str | os.PathLike,
        *,
        client_factory: Callable[[], object] | None = None,
        backoff_initial_s: float | None = None,
        backoff_max_s: float | None = None,
    ):
        backoff_initial_s = BACKOFF_INITIAL_S if backoff_initial_s is None else backoff_initial_s
        backoff_max_s = BACKOFF_MAX_S if backoff_max_s is None else backoff_max_s
        if not (backoff_initial_s > 0 and backoff_max_s >= backoff_initial_s):
            raise ValueError(
                f"need 0 < backoff_initial_s <= backoff_max_s, got {backoff_initial_s}, {backoff_max_s}"
            )
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.spool = MetricSpool(spool_path(spool_dir, run_id))
        self._client_factory = client_factory
        self._client = None
        self._backoff = (float(backoff_initial_s), float(backoff_max_s))
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._stop = False
        self._fresh: set[str] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.failures = 0
        self.last_error: BaseException | None = None

    def _get_client(self):
        if self._client is None:
            if self._client_factory is not None:
                self._client = self._client_factory()
            else:
                from orchestrator.tracking import make_client

                self._client = make_client(self.tracking_uri)
        return self._client

    def submit(self, values: Mapping[str, float], step: int) -> None:
        """Spool ``values`` at ``step`` (now's timestamp) and wake the sender; never blocks on the network."""
        with self._lock:
            self._idle.clear()
            seq = self.spool.append(values, step)
            self._fresh.add(seq)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"mlflow-sender-{self.run_id}", daemon=True
                )
                self._thread.start()
        self._wake.set()

    def start(self) -> None:
        """Start the thread now (it replays what an earlier process left pending)."""
        with self._lock:
            self._idle.clear()
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"mlflow-sender-{self.run_id}", daemon=True
                )
                self._thread.start()
        self._wake.set()

    def _run(self) -> None:
        delay = self._backoff[0]
        while not self._stop:
            self._wake.wait(timeout=None if self._idle.is_set() else delay)
            self._wake.clear()
            try:
                deliver_pending(self.spool, self.run_id, self._get_client(), self._fresh)
            except Exception as err:  # the server is down or refused: keep the values, try again later
                self.failures += 1
                self.last_error = err
                logger.warning(
                    "MLflow delivery to %s failed (%d value(s) pending, retry in %.0f s): %s",
                    self.tracking_uri,
                    self.spool.pending_values(),
                    delay,
                    err,
                )
                delay = min(delay * 2, self._backoff[1])
                continue
            delay = self._backoff[0]
            with self._lock:
                if not self.spool.pending():
                    self._idle.set()

    def flush(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` for the spool to drain; returns the values still pending."""
        if self._thread is not None:
            self._wake.set()
            self._idle.wait(timeout=max(0.0, timeout_s))
        return self.spool.pending_values()

    def close(self) -> None:
        self._stop = True
        self._wake.set()


def tracking_server_reachable(tracking_uri: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """True unless ``tracking_uri`` is an HTTP(S) server whose ``/health`` does not answer OK in time.

    Local stores (``sqlite:``, files) count as reachable: their errors are not outages.
    """
    if not tracking_uri.startswith(("http://", "https://")):
        return True
    try:
        with urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=timeout_s) as reply:
            return 200 <= reply.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_for_tracking_server(tracking_uri: str, wait_s: float, poll_s: float = 2.0) -> bool:
    """Probe until the server answers or ``wait_s`` has passed; returns whether it answered."""
    deadline = time.monotonic() + max(0.0, wait_s)
    while True:
        if tracking_server_reachable(tracking_uri):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())) or 0.01)


__all__ = [
    "BACKOFF_INITIAL_S",
    "BACKOFF_MAX_S",
    "SPOOL_DIR",
    "TAG_REPLAYED_VALUES",
    "MetricSender",
    "MetricSpool",
    "SpoolRecord",
    "deliver_pending",
    "spool_path",
    "tracking_server_reachable",
    "wait_for_tracking_server",
]
