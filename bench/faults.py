"""Faults that lose nothing: `fowkal train` on the embedded default under faults, against `mlflow server`.

    .venv/bin/python bench/faults.py                 # every scenario, 60 s outages
    .venv/bin/python bench/faults.py --only outage-short,end-down --outage 60

Each scenario runs `fowkal train --config configs/smoke.yaml` (or `--config configs/smoke_kapao.yaml`: the
same scenarios for the KAPAO family, with its own arms and space) (smaller by --set: --epochs epochs of
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
- ctrl-c: SIGINT to `fowkal train` after epoch 2 (exit 130), then the same command again (resume);
- node-removal: a two-node local cluster (``ray.cluster_utils.Cluster``, one CPU each) that `fowkal train
  --address` joins with two workers (one per node); the worker node is removed (its processes SIGKILLed)
  after epoch 2 and a new one-CPU node joins `--replace-after` s later: Ray Train restarts the worker group
  from the last checkpoint (max_failures=2).

Sweeps (`fowkal ablate` over two arms x one seed, `fowkal tune` with two TPE samples, `--sweep-epochs`
epochs of `--sweep-images` images each, the local Ray the command starts) against the same kind of server:

- ablate-baseline, tune-baseline: no fault (what the sweep rows are compared with);
- ablate-driver-kill, tune-driver-kill: the driver (`fowkal ablate` / `fowkal tune`) is SIGKILLed once a
  trial has reported epoch 2 (the local Ray it started is killed after it), then the same command is run
  again: Tune's state is restored, the interrupted trial continues from its checkpoint;
- nan-trial: an ablation whose second arm diverges (`optim.lr: 1e30` in the arms file): that trial must be
  FAILED with the non-finite-loss error, the other FINISHED, and the parent must say how many failed.

Per scenario: outcome, epochs in MLflow / expected (distinct steps of train/loss; for sweeps summed over the
child runs), duplicates (values logged twice at one step), the run's status and fowkal.replayed_values tag
(sweeps: the parent's status and the children's), and wall time (all commands of the scenario) vs the
baseline of its kind. "nothing lost" = every epoch once, FINISHED.
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

from trainer.config import load_config  # noqa: E402

SMOKE = REPO / "configs" / "smoke.yaml"
VENV_BIN = Path(sys.executable).parent
TRAIN_SCENARIOS = (
    "baseline",
    "outage-short",
    "outage-long",
    "end-down",
    "worker-kill",
    "ctrl-c",
    "node-removal",
)
SWEEP_SCENARIOS = ("ablate-baseline", "ablate-driver-kill", "tune-baseline", "tune-driver-kill", "nan-trial")
SCENARIOS = TRAIN_SCENARIOS + SWEEP_SCENARIOS
TUNE_SPACE = """\
metric: val/wholebody_AP
mode: max
parameters:
  loss.variant: fowkal
  loss.omega: {distribution: uniform, low: 5.0, high: 30.0, paper: 14.0}
"""
ARMS = """\
arms:
  - {key: a, name: mse, label: (a) MSE, table: '2', overrides: {loss.variant: mse},
     paper: {wholebody_AP: 58.2}}
  - {key: f, name: fowkal, label: (f) FoWKAL, table: '2', overrides: {loss.variant: fowkal%s},
     paper: {wholebody_AP: 61.6}}
"""

# The same scenarios for a KAPAO config (--config configs/smoke_kapao.yaml): its loss key, arms and lr key.
KAPAO_TUNE_SPACE = """\
family: kapao
metric: val/wholebody_AP
mode: max
parameters:
  loss.kp: {distribution: loguniform, low: 0.0025, high: 0.25, paper: 0.025}
"""
KAPAO_ARMS = """\
arms:
  - {key: a, name: bs05, label: bs/w 0.05, family: kapao, overrides: {data.kp_bbox: 0.05}}
  - {key: f, name: bs10, label: bs/w 0.1, family: kapao, overrides: {data.kp_bbox: 0.1%s}}
"""
# Per family: the tune space, the arms (%s: the nan-trial's diverging override), that override.
SWEEP_FILES = {
    "topdown_heatmap": (TUNE_SPACE, ARMS, ", optim.lr: 1.0e+30"),
    "kapao": (KAPAO_TUNE_SPACE, KAPAO_ARMS, ", optim.lr0: 1.0e+30"),
}


def baseline_of(name: str) -> str:
    """The no-fault scenario a scenario's wall time is compared with."""
    if name.startswith("tune-"):
        return "tune-baseline"
    if name.startswith("ablate-") or name == "nan-trial":
        return "ablate-baseline"
    return "baseline"


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _experiment_runs(uri: str, experiment: str, **search) -> list:
    """The experiment's runs (``search_runs`` keyword arguments); [] while none or unreachable. Asked without
    retries and with a short timeout, so that polling during an outage returns at once."""
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "3"
    try:
        client = _client(uri)
        exp = client.get_experiment_by_name(experiment)
        return [] if exp is None else client.search_runs([exp.experiment_id], **search)
    except Exception:
        return []


def _steps(uri: str, experiment: str) -> tuple[str | None, list[int]]:
    """(run id, steps of train/loss) of the experiment's newest run; (None, []) while none or unreachable."""
    runs = _experiment_runs(uri, experiment, order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return None, []
    run_id = runs[0].info.run_id
    try:
        return run_id, [m.step for m in _client(uri).get_metric_history(run_id, "train/loss")]
    except Exception:
        return None, []


def _sweep_runs(uri: str, experiment: str) -> tuple[object | None, list]:
    """(parent run, child runs) of the experiment's sweep; (None, []) while none or unreachable."""
    runs = _experiment_runs(uri, experiment)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return (parents[0] if parents else None), children


def _max_child_step(uri: str, experiment: str) -> int:
    _, children = _sweep_runs(uri, experiment)
    return max((_last_step(uri, c.info.run_id) for c in children), default=0)


def _last_step(uri: str, run_id: str) -> int:
    try:
        return max((m.step for m in _client(uri).get_metric_history(run_id, "train/loss")), default=0)
    except Exception:
        return 0


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _kill_all(processes) -> None:
    import psutil

    for proc in processes:
        try:
            proc.kill()
        except psutil.Error:
            pass


def _spooled_steps(output_dir: Path) -> set[int]:
    from orchestrator.runs.metric_spool import MetricSpool

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
        self.sweep = name in SWEEP_SCENARIOS
        self.kind = "tune" if name.startswith("tune-") else "ablate"
        self.address: str | None = None  # node-removal: the local two-node cluster's
        self.epochs = args.sweep_epochs if self.sweep else args.epochs

    def command(self) -> list[str]:
        sets = {
            "output_dir": self.output_dir,
            "data.synthetic_dir": self.args.data_dir,
            "epochs": self.epochs,
            "eval_interval": self.epochs,
            "data.synthetic_train_images": self.args.sweep_images if self.sweep else self.args.images,
            "max_failures": 0 if self.sweep else 2,
        }
        if self.name == "node-removal":
            sets["num_workers"] = 2
        if not self.sweep:
            command = [str(VENV_BIN / "fowkal"), "train", "--config", str(self.args.config)]
            if self.address:
                command += ["--address", self.address]
        elif self.kind == "tune":
            space = self.dir / "space.yaml"
            space.write_text(self.args.sweep_files[0])
            command = [
                str(VENV_BIN / "fowkal"),
                "tune",
                "--config",
                str(self.args.config),
                "--space",
                str(space),
            ]
            command += ["--samples", "2", "--quiet"]
        else:
            arms = self.dir / "arms.yaml"
            _, arms_text, diverging = self.args.sweep_files
            arms.write_text(arms_text % (diverging if self.name == "nan-trial" else ""))
            command = [
                str(VENV_BIN / "fowkal"),
                "ablate",
                "--config",
                str(self.args.config),
                "--arms",
                str(arms),
            ]
            command += ["--seeds", "1", "--quiet"]
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
            if self.name == "node-removal":
                return self._node_removal()
            return self._sweep() if self.sweep else self._run()
        finally:
            self.server.stop()

    def _node_removal(self) -> dict:
        import ray
        from ray.cluster_utils import Cluster

        os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")  # the nodes' workers inherit it
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        node = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        self.address = cluster.address

        def remove_node(process):
            if self.wait_for_epoch(process, 2):
                cluster.remove_node(node, allow_graceful=False)
                deadline = time.monotonic() + self.args.replace_after
                while time.monotonic() < deadline and process.poll() is None:
                    time.sleep(0.5)
                cluster.add_node(num_cpus=1)

        try:
            self.run_once(remove_node)
        finally:
            ray.shutdown()
            cluster.shutdown()
        return self._train_row()

    def _sweep(self) -> dict:
        def kill_driver(process):
            while process.poll() is None and _max_child_step(self.server.uri, self.experiment) < 2:
                time.sleep(0.5)
            leftovers = _descendants(process.pid)  # the local Ray this driver started outlives it
            process.kill()
            process.wait()
            time.sleep(2)
            _kill_all(leftovers)

        if self.name.endswith("driver-kill"):
            self.run_once(kill_driver)
        self.run_once(None)
        parent, children = _sweep_runs(self.server.uri, self.experiment)
        client = _client(self.server.uri)
        epochs = self.epochs
        found = expected = duplicates = 0
        lost: list[str] = []
        statuses = Counter()
        failed_errors = []
        for child in children:
            steps = [m.step for m in client.get_metric_history(child.info.run_id, "train/loss")]
            counts = Counter(steps)
            statuses[child.info.status] += 1
            duplicates += sum(n - 1 for n in counts.values() if n > 1)
            if child.info.status == "FAILED":
                failed_errors.append(child.data.tags.get("fowkal.error", ""))
                continue  # a diverged trial has no epoch to keep
            expected += epochs
            found += len(set(steps) & set(range(1, epochs + 1)))
            missing = sorted(set(range(1, epochs + 1)) - set(steps))
            if missing:
                lost.append(f"{child.info.run_name} {missing}")
        trials = 2
        parent_status = parent.info.status if parent else "-"
        failed_tag = parent.data.tags.get("fowkal.failed_trials", "") if parent else ""
        if self.name == "nan-trial":
            diverged = len(failed_errors) == 1 and failed_errors[0].startswith(
                "FloatingPointError: non-finite"
            )
            ok = diverged and statuses["FINISHED"] == trials - 1 and failed_tag == f"1 of {trials}"
        else:
            ok = statuses["FINISHED"] == trials
        ok = ok and not lost and not duplicates and len(children) == trials and parent_status == "FINISHED"
        outcome = "nothing lost" if ok else (f"LOST {'; '.join(lost)}" if lost else "CHECK")
        if self.name == "nan-trial":
            error = failed_errors[0][:60] if failed_errors else "no FAILED trial"
            outcome += f"; 1 FAILED ({error}...), parent: failed_trials={failed_tag!r}"
        counts = ", ".join(f"{n} {k}" for k, n in sorted(statuses.items()))
        status = f"parent {parent_status}, children {counts}"
        return {
            "scenario": self.name,
            "exits": ",".join(str(code) for code in self.exits),
            "outcome": outcome,
            "epochs": f"{found}/{expected}",
            "duplicates": duplicates,
            "status": status,
            "replayed": ",".join(c.data.tags.get("fowkal.replayed_values", "0") for c in children) or "-",
            "wall_s": self.wall,
        }

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
        return self._train_row()

    def _train_row(self) -> dict:
        epochs = self.epochs
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
    parser.add_argument(
        "--config", default=str(SMOKE), help="the config every scenario runs (a smoke config)"
    )
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--images", type=int, default=128, help="synthetic training images")
    parser.add_argument("--outage", type=float, default=60.0, help="seconds the server is down mid-training")
    parser.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios")
    parser.add_argument("--sweep-epochs", type=int, default=6, help="epochs of each sweep trial")
    parser.add_argument("--sweep-images", type=int, default=32, help="synthetic training images of sweeps")
    parser.add_argument(
        "--replace-after", type=float, default=10.0, help="node-removal: seconds until a new node joins"
    )
    parser.add_argument(
        "--no-baseline", action="store_true", help="do not add the no-fault run of each scenario's kind"
    )
    args = parser.parse_args()
    args.sweep_files = SWEEP_FILES[load_config(args.config).family]
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)}")
    if not args.no_baseline:
        for base_name in dict.fromkeys(baseline_of(n) for n in list(names)):
            if base_name not in names:
                names.insert(0, base_name)
        names.sort(key=lambda n: (SCENARIOS.index(baseline_of(n)), n != baseline_of(n)))
    root = Path(tempfile.mkdtemp(prefix="fowkal_faults_"))
    args.data_dir = root / "synthetic"
    rows = []
    for name in names:
        row = Scenario(name, args, root).run()
        rows.append(row)
        print(row, flush=True)
    walls = {row["scenario"]: row["wall_s"] for row in rows}
    print(
        f"\ntrain: {args.epochs} epochs x {args.images} images, outage {args.outage:.0f} s; sweeps: 2 trials "
        f"x {args.sweep_epochs} epochs x {args.sweep_images} images; work dir {root}\n"
    )
    print(
        "| scenario | outcome | epochs in MLflow / expected | duplicates | status | replayed values "
        "| exits | wall time vs no fault |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        base = walls.get(baseline_of(row["scenario"]))
        ratio = f"{row['wall_s']:.0f} s" + (f" ({row['wall_s'] / base:.2f}x)" if base else "")
        print(
            f"| {row['scenario']} | {row['outcome']} | {row['epochs']} | {row['duplicates']} "
            f"| {row['status']} | {row['replayed']} | {row['exits']} | {ratio} |"
        )
    return 0 if all(row["outcome"].startswith("nothing lost") for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
