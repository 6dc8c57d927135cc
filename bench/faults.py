"""Faults that lose nothing: `fowkal train` on the embedded default under faults, against `mlflow server`.

    .venv/bin/python bench/faults.py                 # every scenario, 60 s outages
    .venv/bin/python bench/faults.py --only outage-short,end-down --outage 60

Each scenario runs `fowkal train --config configs/smoke.yaml` (smaller by --set: --epochs epochs of
--images synthetic images, evaluation at the last) as a fresh process, against an `mlflow server` (SQLite
backend) on 127.0.0.1 that this script starts, kills and restarts. The fault is injected when MLflow (or,
during an outage, the run's spool) shows that an epoch was reported:

- baseline: no fault (the wall time the others are compared with);
- outage-short: the server is SIGKILLed after epoch 1 and back `--outage` s later (MLflow's default retries);
- outage-long: the same with MLFLOW_HTTP_REQUEST_MAX_RETRIES=0 (every call fails at once: an outage longer
  than the client's retry budget);
- end-down: the server dies after the last-but-one epoch and is back only after the command has exited
  (non-zero, naming the server); the same command is run again and must complete the record;
- worker-kill: a RayTrainWorker is SIGKILLed after epoch 2 (max_failures=2): Ray Train restarts it from the
  last checkpoint;
- ctrl-c: SIGINT to `fowkal train` after epoch 2 (exit 130), then the same command again (resume).

Per scenario: outcome, epochs in MLflow / expected (distinct steps of train/loss), duplicates (values logged
twice at one step), the run's status and fowkal.replayed_values tag, and wall time (all commands of the
scenario) vs the baseline. "nothing lost" = every epoch once, FINISHED.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from services import MlflowServer  # noqa: E402

SMOKE = REPO / "configs" / "smoke.yaml"
VENV_BIN = Path(sys.executable).parent
SCENARIOS = ("baseline", "outage-short", "outage-long", "end-down", "worker-kill", "ctrl-c")


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _steps(uri: str, experiment: str) -> tuple[str | None, list[int]]:
    """(run id, steps of train/loss) of the experiment's newest run; (None, []) while none or unreachable."""
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "3"
    try:
        client = _client(uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return None, []
        runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
        if not runs:
            return None, []
        run_id = runs[0].info.run_id
        return run_id, [m.step for m in client.get_metric_history(run_id, "train/loss")]
    except Exception:
        return None, []


def _spooled_steps(output_dir: Path) -> set[int]:
    from orchestrator.metric_spool import MetricSpool

    steps: set[int] = set()
    for path in (output_dir / "mlflow_spool").glob("*.jsonl"):
        steps.update(record.step for record in MetricSpool(path).pending())
    return steps


class Scenario:
    def __init__(self, name: str, args, root: Path):
        self.name, self.args = name, args
        self.dir = root / name
        self.dir.mkdir(parents=True)
        self.server = MlflowServer(
            self.dir, f"sqlite:///{self.dir / 'mlflow.db'}", (self.dir / "art").as_uri()
        )
        self.experiment = f"faults-{name}"
        self.output_dir = self.dir / "out"
        self.exits: list[int] = []
        self.wall = 0.0

    def command(self) -> list[str]:
        sets = {
            "output_dir": self.output_dir,
            "data.synthetic_dir": self.args.data_dir,
            "epochs": self.args.epochs,
            "eval_interval": self.args.epochs,
            "data.synthetic_train_images": self.args.images,
            "max_failures": 2,
        }
        command = [str(VENV_BIN / "fowkal"), "train", "--config", str(SMOKE)]
        command += ["--tracking-uri", self.server.uri, "--experiment", self.experiment]
        for key, value in sets.items():
            command += ["--set", f"{key}={value}"]
        return command

    def env(self) -> dict:
        env = dict(os.environ)
        env.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
        env.pop("MLFLOW_HTTP_REQUEST_TIMEOUT", None)
        if self.name == "outage-long":
            env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        return env

    def wait_for_epoch(self, process, epoch: int) -> bool:
        while process.poll() is None:
            _, steps = _steps(self.server.uri, self.experiment)
            if epoch in steps or epoch in _spooled_steps(self.output_dir):
                return True
            time.sleep(0.5)
        return False

    def run_once(self, inject) -> int:
        log = open(self.dir / f"train-{len(self.exits)}.log", "w")
        start = time.perf_counter()
        process = subprocess.Popen(
            self.command(),
            cwd=REPO,
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if inject is not None:
            inject(process)
        code = process.wait()
        self.wall += time.perf_counter() - start
        self.exits.append(code)
        return code

    def run(self) -> dict:
        self.server.start()
        try:
            return self._run()
        finally:
            self.server.stop()

    def _run(self) -> dict:
        epochs, outage = self.args.epochs, self.args.outage

        def outage_after(epoch: int, restart_after_exit: bool = False):
            def inject(process):
                if self.wait_for_epoch(process, epoch):
                    self.server.stop()
                    if restart_after_exit:
                        return
                    deadline = time.monotonic() + outage
                    while time.monotonic() < deadline and process.poll() is None:
                        time.sleep(0.5)
                    self.server.start()

            return inject

        def kill_worker(process):
            import psutil

            if self.wait_for_epoch(process, 2):
                # Only this run's worker: a descendant of its `fowkal train` (the local Ray it started).
                for proc in psutil.Process(process.pid).children(recursive=True):
                    try:
                        title = " ".join(proc.cmdline()) + proc.name()
                    except psutil.Error:
                        continue
                    if "RayTrainWorker" in title:
                        proc.kill()
                        break

        def interrupt(process):
            if self.wait_for_epoch(process, 2):
                os.kill(process.pid, signal.SIGINT)

        if self.name == "baseline":
            self.run_once(None)
        elif self.name in ("outage-short", "outage-long"):
            self.run_once(outage_after(1))
        elif self.name == "end-down":
            self.run_once(outage_after(epochs - 1, restart_after_exit=True))
            self.server.start()
            self.run_once(None)
        elif self.name == "worker-kill":
            self.run_once(kill_worker)
        elif self.name == "ctrl-c":
            self.run_once(interrupt)
            self.run_once(None)
        run_id, steps = _steps(self.server.uri, self.experiment)
        run = _client(self.server.uri).get_run(run_id) if run_id else None
        self.server.stop()
        counts = Counter(steps)
        expected = list(range(1, epochs + 1))
        status = run.info.status if run else "-"
        lost = sorted(set(expected) - set(steps))
        duplicates = sum(n - 1 for n in counts.values() if n > 1)
        nothing_lost = not lost and not duplicates and status == "FINISHED"
        return {
            "scenario": self.name,
            "exits": ",".join(str(code) for code in self.exits),
            "outcome": "nothing lost" if nothing_lost else f"LOST {lost}" if lost else status,
            "epochs": f"{len(counts)}/{epochs}",
            "duplicates": duplicates,
            "status": status,
            "replayed": (run.data.tags.get("fowkal.replayed_values", "0") if run else "-"),
            "wall_s": self.wall,
        }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # Long enough that a 60 s outage after epoch 1 ends before training does (epochs take ~5 s here).
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--images", type=int, default=128, help="synthetic training images")
    parser.add_argument("--outage", type=float, default=60.0, help="seconds the server is down mid-training")
    parser.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)}")
    if "baseline" not in names:
        names.insert(0, "baseline")
    root = Path(tempfile.mkdtemp(prefix="fowkal_faults_"))
    args.data_dir = root / "synthetic"
    rows = []
    for name in names:
        row = Scenario(name, args, root).run()
        rows.append(row)
        print(row, flush=True)
    base = rows[0]["wall_s"]
    print(f"\n{args.epochs} epochs x {args.images} images, outage {args.outage:.0f} s; work dir {root}\n")
    print(
        "| scenario | outcome | epochs in MLflow / expected | duplicates | status | replayed values "
        "| exits | wall time vs no fault |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        ratio = f"{row['wall_s']:.0f} s ({row['wall_s'] / base:.2f}x)"
        print(
            f"| {row['scenario']} | {row['outcome']} | {row['epochs']} | {row['duplicates']} "
            f"| {row['status']} | {row['replayed']} | {row['exits']} | {ratio} |"
        )
    return 0 if all(row["outcome"] == "nothing lost" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
