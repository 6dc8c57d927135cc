"""Metric logging that never blocks and never loses: the spool, the sender thread, replays, the callback."""

from __future__ import annotations

import threading
import time

import pytest

from orchestrator import tracking
from orchestrator.runs import metric_spool
from orchestrator.runs.metric_spool import (
    TAG_REPLAYED_VALUES,
    MetricSender,
    MetricSpool,
    deliver_pending,
    spool_path,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    out = tmp_path_factory.mktemp("spool_store")
    uri = tracking.resolve_tracking_uri(f"sqlite:///{out / 'mlflow.db'}", out)
    client = tracking.make_client(uri)
    experiment_id = tracking.get_or_create_experiment(client, "test-spool")
    return uri, client, experiment_id


class FlakyClient:
    """An MLflow client whose server can be 'down' (raises) or 'hanging' (blocks until released)."""

    def __init__(self, uri):
        self.inner = tracking.make_client(uri)
        self.down = False
        self.hang = threading.Event()
        self.hang.set()
        self.calls = 0

    def log_batch(self, run_id, metrics=(), **kwargs):
        self.calls += 1
        self.hang.wait()
        if self.down:
            raise ConnectionError("tracking server down")
        return self.inner.log_batch(run_id, metrics=metrics, **kwargs)

    def set_tag(self, *args):
        if self.down:
            raise ConnectionError("tracking server down")
        return self.inner.set_tag(*args)


def _history(uri, run_id, key):
    from mlflow.tracking import MlflowClient  # not tracking.make_client, which a test replaces

    return [(m.step, m.value, m.timestamp) for m in MlflowClient(uri).get_metric_history(run_id, key)]


def _wait_until(predicate, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_spool_keeps_records_until_acknowledged_and_skips_a_torn_line(tmp_path):
    spool = MetricSpool(spool_path(tmp_path, "abc123"))
    first = spool.append({"train/loss": 0.5}, 1, timestamp_ms=1000)
    spool.append({"train/loss": float("nan")}, 2, timestamp_ms=2000)
    with open(spool.path, "a") as stream:
        stream.write('{"seq": "torn", "st')  # a process killed mid-write
    pending = spool.pending()
    assert [(r.step, r.timestamp_ms) for r in pending] == [(1, 1000), (2, 2000)]
    assert pending[1].values["train/loss"] != pending[1].values["train/loss"]  # NaN kept as NaN
    spool.acknowledge([first], replayed_values=1)
    assert [r.step for r in MetricSpool(spool.path).pending()] == [2]
    assert spool.replayed_total() == 1
    with pytest.raises(ValueError, match="step must be a non-negative integer"):
        spool.append({"x": 1.0}, -1)
    with pytest.raises(ValueError, match="plain MLflow run id"):
        spool_path(tmp_path, "../escape")


def test_sender_never_blocks_and_delivers_every_value_once_after_an_outage(tmp_path, store):
    uri, client, experiment_id = store
    run_id = tracking.start_run(client, experiment_id, "outage")
    flaky = FlakyClient(uri)
    sender = MetricSender(
        uri, run_id, tmp_path, client_factory=lambda: flaky, backoff_initial_s=0.05, backoff_max_s=0.2
    )
    # A hanging server: submit returns anyway (the values are spooled, the thread waits on the server).
    flaky.hang.clear()
    flaky.down = True
    submitted = threading.Event()

    def report_epochs():
        for epoch in (1, 2, 3):
            sender.submit({"train/loss": 1.0 / epoch, "epoch": float(epoch)}, epoch)
        submitted.set()

    threading.Thread(target=report_epochs, daemon=True).start()
    assert submitted.wait(10), "submit blocked on a hanging tracking server"
    flaky.hang.set()  # the server now answers with errors: the sender retries with backoff
    assert _wait_until(lambda: sender.failures >= 2)
    assert _history(uri, run_id, "train/loss") == []
    assert sender.spool.pending_values() == 6
    timestamps = [r.timestamp_ms for r in sender.spool.pending()]

    flaky.down = False  # back: everything arrives, at its own step and original timestamp
    assert sender.flush(30) == 0
    history = _history(uri, run_id, "train/loss")
    assert [(step, value) for step, value, _ in history] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert [ts for _, _, ts in history] == timestamps
    # The three reports were tried while the server was down: their 6 values count as replayed.
    assert tracking.make_client(uri).get_run(run_id).data.tags[TAG_REPLAYED_VALUES] == "6"

    sender.submit({"train/loss": 0.25, "epoch": 4.0}, 4)  # a value that goes through at once
    assert sender.flush(30) == 0
    assert [s for s, _, _ in _history(uri, run_id, "train/loss")] == [1, 2, 3, 4]
    assert tracking.make_client(uri).get_run(run_id).data.tags[TAG_REPLAYED_VALUES] == "6"
    sender.close()


def test_a_later_process_replays_the_spool_and_a_repeated_delivery_is_stored_once(tmp_path, store):
    uri, client, experiment_id = store
    run_id = tracking.start_run(client, experiment_id, "replay")
    spool = MetricSpool(spool_path(tmp_path, run_id))
    spool.append({"train/loss": 0.9}, 1, timestamp_ms=111)
    spool.append({"train/loss": 0.8}, 2, timestamp_ms=222)  # left behind by a process that died
    # The first record was delivered but its acknowledgement lost (the process died right after).
    client.log_batch(run_id, metrics=[metric_spool._metric("train/loss", 0.9, 111, 1)])

    assert deliver_pending(MetricSpool(spool.path), run_id, client) == 2
    assert _history(uri, run_id, "train/loss") == [(1, 0.9, 111), (2, 0.8, 222)]
    assert tracking.make_client(uri).get_run(run_id).data.tags[TAG_REPLAYED_VALUES] == "2"
    assert deliver_pending(MetricSpool(spool.path), run_id, client) == 0  # nothing pending any more


def test_report_callback_spools_during_an_outage_and_its_sender_delivers_later(tmp_path, store, monkeypatch):
    from orchestrator.runs.train import MlflowReportCallback

    uri, client, experiment_id = store
    run_id = tracking.start_run(client, experiment_id, "callback")
    flaky = FlakyClient(uri)
    flaky.down = True
    monkeypatch.setattr(tracking, "make_client", lambda _uri: flaky)
    monkeypatch.setattr(metric_spool, "BACKOFF_INITIAL_S", 0.05)
    monkeypatch.setattr(metric_spool, "BACKOFF_MAX_S", 0.2)
    callback = MlflowReportCallback(uri, run_id, spool_dir=str(tmp_path), final_epoch=3, final_flush_s=0.2)
    callback = pickle_round_trip(callback)  # as Ray ships it to the controller
    for epoch in (1, 2):
        callback.after_report(None, [{"epoch": epoch, "train/loss": 1.0 / epoch, "note": "text"}], None)
    # The last epoch's report waits a bounded time for the spool to drain and then returns.
    callback.after_report(None, [{"epoch": 3, "train/loss": 0.3}], None)
    spool = MetricSpool(spool_path(tmp_path, run_id))
    assert [r.step for r in spool.pending()] == [1, 2, 3]
    assert spool.pending()[0].values == {"train/loss": 1.0}  # numbers only; the epoch is the step
    flaky.down = False
    assert callback._sender.flush(30) == 0
    assert [s for s, _, _ in _history(uri, run_id, "train/loss")] == [1, 2, 3]


def pickle_round_trip(obj):
    import pickle

    return pickle.loads(pickle.dumps(obj))


def test_tracking_server_probe(tmp_path):
    assert metric_spool.tracking_server_reachable(f"sqlite:///{tmp_path}/x.db")
    # A port nobody listens on (bound, never listening) answers nothing.
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        assert not metric_spool.tracking_server_reachable(f"http://127.0.0.1:{port}", timeout_s=1.0)
        assert not metric_spool.wait_for_tracking_server(f"http://127.0.0.1:{port}", 0.0)


def test_finish_marker_sits_beside_the_spool(tmp_path):
    from orchestrator.runs.train import finish_marker

    spool = MetricSpool(spool_path(tmp_path, "run9"))
    assert finish_marker(spool) == tmp_path.resolve() / "mlflow_spool" / "run9.finish.json"


def test_server_unreachable_at_the_end_keeps_the_record_and_names_server_and_pending(
    tmp_path, store, monkeypatch
):
    import socket

    import orchestrator.runs.train as train
    from trainer.config import config_from_dict

    uri, client, experiment_id = store
    run_id = tracking.start_run(client, experiment_id, "end-outage")
    spool = MetricSpool(spool_path(tmp_path, run_id))
    spool.append({"train/loss": 0.7, "epoch": 2.0}, 2)
    with socket.socket() as sock:  # a server address that answers nothing
        sock.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{sock.getsockname()[1]}"
        monkeypatch.setattr(train, "FINISH_WAIT_S", 0.0)
        finished = []
        monkeypatch.setattr(train, "_finish", lambda *args: finished.append(args))
        config = config_from_dict({"name": "x", "output_dir": str(tmp_path)})
        with pytest.raises(train.TrackingIncomplete, match=rf"{down}.*2 metric value\(s\).*FINISHED") as err:
            train._record_finished(config, None, client, run_id, down, "x-run", str(tmp_path), spool, print)
    assert err.value.run_id == run_id and not finished
    marker = train.finish_marker(spool)
    assert marker.is_file() and '"status": "FINISHED"' in marker.read_text()
    assert spool.pending_values() == 2  # still kept for the re-run
    assert client.get_run(run_id).info.status == "RUNNING"

    # The server is back (here: the reachable store): the same call completes the record.
    monkeypatch.setattr(train, "_finish", lambda *args: finished.append(args) or "outcome")
    assert train._record_finished(config, None, client, run_id, uri, "x-run", "", spool, print) == "outcome"
    assert client.get_run(run_id).info.status == "FINISHED"
    assert not marker.exists() and spool.pending_values() == 0
    assert [s for s, _, _ in _history(uri, run_id, "train/loss")] == [2]


def test_a_worker_error_tag_never_holds_up_the_controller(tmp_path, store, monkeypatch):
    from orchestrator.runs.train import MlflowReportCallback

    uri, client, experiment_id = store
    run_id = tracking.start_run(client, experiment_id, "worker-error")
    flaky = FlakyClient(uri)
    flaky.hang.clear()  # the server hangs

    def set_tag(*args):
        flaky.hang.wait()
        return flaky.inner.set_tag(*args)

    flaky.set_tag = set_tag
    monkeypatch.setattr(tracking, "make_client", lambda _uri: flaky)
    callback = MlflowReportCallback(uri, run_id, spool_dir=str(tmp_path))
    returned = threading.Event()
    threading.Thread(
        target=lambda: (callback.after_exception(None, {0: RuntimeError("worker died")}), returned.set()),
        daemon=True,
    ).start()
    assert returned.wait(10), "after_exception waited on a hanging tracking server"
    flaky.hang.set()
    from mlflow.tracking import MlflowClient

    assert _wait_until(
        lambda: MlflowClient(uri).get_run(run_id).data.tags.get(tracking.TAG_LAST_WORKER_ERROR)
    )
    assert MlflowClient(uri).get_run(run_id).data.tags[tracking.TAG_LAST_WORKER_ERROR] == "worker died"
