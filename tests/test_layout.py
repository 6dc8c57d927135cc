"""The house's boundaries: ``trainer/`` never loads Ray Tune, Ray Train or MLflow, and trains on its own."""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import trainer

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = ("ray.tune", "ray.train", "mlflow")


def _run_python(code: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_every_trainer_module_imports_without_ray_tune_train_or_mlflow():
    modules = sorted(m.name for m in pkgutil.walk_packages(trainer.__path__, "trainer."))
    assert {
        "trainer.loop",
        "trainer.topdown.losses",
        "trainer.checkpoint",
        "trainer.topdown.inference",
    } <= set(modules)
    result = _run_python(
        f"""
        import importlib, json, sys
        loaded = {{}}
        for name in {modules!r}:
            importlib.import_module(name)
            loaded[name] = sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "mlflow"))
        print(json.dumps(loaded))
        """
    )
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    for module, names in loaded.items():
        bad = [n for n in names if any(n == f or n.startswith(f + ".") for f in FORBIDDEN)]
        assert not bad, f"importing {module} loaded {bad}"


@pytest.mark.slow
def test_python_m_trainer_trains_and_resumes_without_ray_or_mlflow(tmp_path):
    out = tmp_path / "run"
    sets = [
        f"output_dir={out}",
        f"data.synthetic_dir={tmp_path / 'synth'}",
        "data.synthetic_train_images=6",
        "data.synthetic_val_images=2",
        "data.loader_workers=0",
        "data.pipeline.input_size=[64,64]",
        "data.pipeline.heatmap_size=[16,16]",
        "batch_size=4",
        "eval_interval=1",
        "epochs=1",
    ]
    argv = ["--config", "configs/smoke.yaml", *[a for s in sets for a in ("--set", s)]]
    code = f"""
        import json, runpy, sys
        import torch
        torch.set_num_threads(1)
        sys.argv = ["python -m trainer", *{argv!r}]
        try:
            runpy.run_module("trainer", run_name="__main__")
        except SystemExit as exit:
            assert exit.code in (0, None), exit.code
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "mlflow"))))
        """
    first = _run_python(code)
    assert first.returncode == 0, first.stderr[-3000:]
    loaded = json.loads(first.stdout.strip().splitlines()[-1])
    assert not [n for n in loaded if any(n == f or n.startswith(f + ".") for f in FORBIDDEN)], loaded
    assert (out / "checkpoints" / "latest.pt").is_file()
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1]
    # The same command with one more epoch resumes from latest.pt instead of starting over.
    second = _run_python(code.replace("'epochs=1'", "'epochs=2'"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming at epoch 2/2" in second.stdout
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]


def test_python_m_trainer_names_a_bad_key_before_any_work(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "trainer", "--config", "configs/smoke.yaml", "--set", "loss.gama=0.1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "loss.gama" in result.stderr and "loss.gamma" in result.stderr


def test_no_import_circles_between_modules():
    """Module-level imports of trainer/ and orchestrator/ form no cycle (lazy imports inside functions are
    how a module reaches one that imports it)."""
    import ast

    modules = {}
    for package in ("trainer", "orchestrator"):
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = path
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}

    def cycle_from(start, seen=()):
        for nxt in sorted(graph[start]):
            if nxt in seen:
                return [*seen[seen.index(nxt) :], nxt]
            found = cycle_from(nxt, (*seen, nxt))
            if found:
                return found
        return None

    done: set[str] = set()
    for name in sorted(graph):
        if name not in done:
            cycle = cycle_from(name, (name,))
            assert cycle is None, f"import circle: {' -> '.join(cycle)}"
            done.add(name)


def test_user_facing_import_paths_still_work():
    from trainer.config import load_config
    from trainer.losses import LOSS_VARIANTS, HeatmapLoss
    from trainer.topdown.losses import HeatmapLoss as moved

    assert HeatmapLoss is moved and "fowkal" in LOSS_VARIANTS and callable(load_config)
