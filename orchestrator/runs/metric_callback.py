"""Per-epoch metrics of a Ray Train run into its MLflow run: :class:`MlflowReportCallback`, for ``fowkal
train`` and every sweep trial alike.

It is a ``ray.train.UserCallback``: Ray Train calls its ``after_report`` on the run's *controller* after
every ``ray.train.report`` of all workers, with the list of the workers' metric dicts; it logs rank 0's. We
chose it over tailing a metrics file that the workers write because (a) ``trainer/`` stays free of any
tracking code and of any file format contract, (b) it sees exactly what Ray Train registered (same epochs as
the checkpoints), and (c) the Train V2 controller is pinned to the driver's node (a label selector on the
driver's node id), so a local SQLite store is reachable from it just as from the driver. The callback never
raises: an MLflow hiccup is logged as a warning and training goes on.
"""

from __future__ import annotations

import logging
import math
import threading
from pathlib import Path

from ray.train import UserCallback

from orchestrator import tracking
from orchestrator.runs.metric_spool import MetricSender

logger = logging.getLogger(__name__)

# How long a sweep trial's last report waits for its metrics to reach MLflow (values left stay spooled).
FINAL_FLUSH_S = 30.0


class MlflowReportCallback(UserCallback):
    """Logs rank 0's metrics of every ``ray.train.report`` to an MLflow run, at step = the reported epoch.

    Runs on the Ray Train controller (pickled there). Nothing here waits on the tracking server: the values
    go to the run's spool under ``spool_dir`` and a sender thread delivers them with retries
    (``orchestrator.runs.metric_spool``), so an outage neither stalls training nor loses values. With
    ``final_epoch`` (sweep trials, whose driver does not replay the spool afterwards) the report of that
    epoch waits up to ``final_flush_s`` for the spool to drain.
    """

    def __init__(
        self,
        tracking_uri: str,
        run_id: str,
        *,
        spool_dir: str,
        final_epoch: int | None = None,
        final_flush_s: float = FINAL_FLUSH_S,
    ):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.spool_dir = str(Path(spool_dir).expanduser().resolve())
        self.final_epoch = final_epoch
        self.final_flush_s = final_flush_s
        self._client = None
        self._sender = None
        self._reports = 0

    def __getstate__(self):
        state = dict(self.__dict__)
        # A client holds connections and the sender a thread; make fresh ones where it is unpickled.
        state["_client"] = None
        state["_sender"] = None
        return state

    def _get_client(self):
        if self._client is None:
            self._client = tracking.make_client(self.tracking_uri)
        return self._client

    def _get_sender(self) -> MetricSender:
        if self._sender is None:
            self._sender = MetricSender(self.tracking_uri, self.run_id, self.spool_dir)
        return self._sender

    def after_report(self, run_context, metrics, checkpoint):
        self._reports += 1
        if not metrics:
            return
        rank0 = metrics[0]
        try:
            epoch = rank0.get("epoch", self._reports)
            finite = isinstance(epoch, int | float) and not isinstance(epoch, bool) and math.isfinite(epoch)
            step = int(epoch) if finite else self._reports
            sender = self._get_sender()
            sender.submit(tracking.epoch_metric_values(rank0), step)
            if self.final_epoch is not None and step >= self.final_epoch:
                left = sender.flush(self.final_flush_s)
                if left:
                    logger.warning(
                        "%d metric value(s) of run %s not yet in MLflow at %s; they stay in %s",
                        left,
                        self.run_id,
                        self.tracking_uri,
                        sender.spool.path,
                    )
        except Exception as err:  # never let tracking break training
            logger.warning("MLflow logging of report %d failed: %s", self._reports, err)

    def after_exception(self, run_context, worker_exceptions):
        first = next(iter(worker_exceptions.values()), None)

        def set_tag():
            try:
                self._get_client().set_tag(self.run_id, tracking.TAG_LAST_WORKER_ERROR, str(first)[:4000])
            except Exception as err:
                logger.warning("MLflow logging of a worker error failed: %s", err)

        # In a thread: the controller restarts the workers meanwhile, whatever the tracking server does.
        threading.Thread(target=set_tag, name="mlflow-worker-error", daemon=True).start()


__all__ = ["FINAL_FLUSH_S", "MlflowReportCallback"]
