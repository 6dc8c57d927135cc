"""`fowkal report`: sweeps and ablations read back from MLflow (a SQLite store filled by hand, no Ray).

The expected numbers are computed in the tests with NumPy from the values the test itself logged.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from orchestrator import report, tracking

ARMS = [
    {
        "key": "a",
        "name": "mse",
        "label": "(a) MSE (baseline)",
        "overrides": {"loss.variant": "mse"},
        "paper": {"wholebody_AP": 58.2, "wholebody_AR": 67.1, "body_AP": 69.4, "hand_AP": 50.3},
        "table": "2",
    },
    {
        "key": "f",
        "name": "fowkal",
        "label": "(f) KAL + FWAHR = FoWKAL",
        "overrides": {"loss.variant": "fowkal"},
        "paper": {"wholebody_AP": 61.6, "body_AP": 72.7},
        "table": "2",
    },
]
# Final validation metrics per (arm, seed); fowkal seed 2 is a run that was KILLED and must be left out.
FINAL = {
    ("a", 0): {"val/wholebody_AP": 0.50, "val/wholebody_AR": 0.61, "val/body_AP": 0.70, "val/hand_AP": 0.20},
    ("a", 1): {"val/wholebody_AP": 0.52, "val/wholebody_AR": 0.60, "val/body_AP": 0.72, "val/hand_AP": 0.25},
    ("a", 2): {"val/wholebody_AP": 0.56, "val/wholebody_AR": 0.65, "val/body_AP": 0.71, "val/hand_AP": 0.22},
    ("f", 0): {"val/wholebody_AP": 0.60, "val/wholebody_AR": 0.70, "val/body_AP": 0.80, "val/hand_AP": 0.30},
    ("f", 1): {"val/wholebody_AP": 0.64, "val/wholebody_AR": 0.71, "val/body_AP": 0.78, "val/hand_AP": 0.33},
    ("f", 2): {"val/wholebody_AP": 0.99, "val/wholebody_AR": 0.99, "val/body_AP": 0.99, "val/hand_AP": 0.99},
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    out = tmp_path_factory.mktemp("report_store")
    uri = f"sqlite:///{out / 'mlflow.db'}"
    client = tracking.make_client(uri)
    return uri, client


def _parent(client, experiment_id, name, kind, metric, mode, extra_tags=None):
    tags = {
        tracking.TAG_SWEEP_KIND: kind,
        tracking.TAG_METRIC: metric,
        tracking.TAG_MODE: mode,
        tracking.TAG_SWEEP_ID: name,
        **(extra_tags or {}),
    }
    return tracking.start_run(client, experiment_id, name, tags=tags)


def _child(client, experiment_id, parent_id, name, tags, params, history, status):
    run_id = tracking.start_run(
        client,
        experiment_id,
        name,
        params=params,
        tags={tracking.TAG_PARENT_RUN_ID: parent_id, **tags},
    )
    for epoch, metrics in enumerate(history, start=1):
        tracking.log_epoch_metrics(run_id, {"epoch": epoch, **metrics}, epoch, client=client)
    tracking.end_run(run_id, status, client=client)
    return run_id


@pytest.fixture(scope="module")
def ablation(store):
    uri, client = store
    experiment_id = tracking.get_or_create_experiment(client, "report-ablation")
    parent = _parent(client, experiment_id, "smoke-ablate-x", "ablate", "val/wholebody_AP", "max")
    client.log_text(parent, json.dumps(ARMS), tracking.ARMS_ARTIFACT)
    for (arm, seed), final in FINAL.items():
        status = "KILLED" if (arm, seed) == ("f", 2) else "FINISHED"
        name = {"a": "mse", "f": "fowkal"}[arm] + f"-s{seed}"
        earlier = {key: value / 2 for key, value in final.items()}  # an earlier eval epoch: not reported
        _child(
            client,
            experiment_id,
            parent,
            name,
            {tracking.TAG_ARM_KEY: arm, tracking.TAG_SEED: str(seed), tracking.TAG_TRIAL_ID: f"t{arm}{seed}"},
            {"seed": seed},
            [earlier, final],
            status,
        )
    tracking.end_run(parent, "FINISHED", client=client)
    return uri, client, parent


def _stats(arm: str, metric: str) -> tuple[float, float]:
    values = np.array([100 * v[metric] for (a, s), v in FINAL.items() if a == arm and (a, s) != ("f", 2)])
    return float(values.mean()), float(values.std(ddof=1))


def test_ablation_rows_mean_std_delta_and_paper(ablation):
    uri, client, parent = ablation
    record = report.load_sweep(client, parent)
    assert record.kind == "ablate" and len(record.children) == 6
    rows = {row.key: row for row in report.ablation_rows(record)}
    assert list(rows) == ["a", "f"]  # the arms file's order
    assert (rows["a"].finished, rows["a"].total) == (3, 3)
    assert (rows["f"].finished, rows["f"].total) == (2, 3)  # the KILLED seed is not averaged
    for key, metric in (("wholebody_AP", "val/wholebody_AP"), ("body_AP", "val/body_AP")):
        for arm in ("a", "f"):
            mean, std = _stats(arm, metric)
            assert rows[arm].mean[key] == pytest.approx(mean, abs=1e-9)
            assert rows[arm].std[key] == pytest.approx(std, abs=1e-9)
    delta = _stats("f", "val/wholebody_AP")[0] - _stats("a", "val/wholebody_AP")[0]
    assert rows["f"].delta == pytest.approx(delta)
    assert rows["a"].delta == pytest.approx(0.0)
    assert rows["f"].paper_delta == pytest.approx(61.6 - 58.2)
    assert rows["f"].paper == ARMS[1]["paper"]

    markdown = report.ablation_markdown(list(rows.values()))
    mean, std = _stats("f", "val/wholebody_AP")
    assert f"{mean:.2f} ± {std:.2f} (61.6)" in markdown
    assert f"{delta:+.2f} ({61.6 - 58.2:+.1f})" in markdown
    assert "(67.1)" in markdown  # whole-body AR of the paper's arm (a)
    assert "(—)" in markdown  # fowkal has no paper number for foot AP here


def test_write_report_markdown_and_self_contained_html(ablation, tmp_path):
    uri, client, parent = ablation
    printed = []
    md_path, html_path = report.write_report(
        "report-ablation", tracking_uri=uri, out_dir=tmp_path, print_fn=printed.append
    )
    text = md_path.read_text()
    assert "(f) KAL + FWAHR = FoWKAL" in text and "(58.2)" in text
    assert text in printed[0]
    page = html_path.read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert page.count("data:image/png;base64,") == 1  # the ablation plot, embedded
    assert 'src="http' not in page and "<script" not in page  # nothing fetched from elsewhere
    mean, std = _stats("a", "val/wholebody_AP")
    assert f"{mean:.2f} ± {std:.2f} (58.2)" in page
    # A parent run id works as the target too, and gives the same table.
    md2, _ = report.write_report(
        parent, tracking_uri=uri, out_dir=tmp_path / "by_id", print_fn=lambda _: None
    )
    assert md2.read_text() == text


def test_cli_report_and_unknown_target(ablation, tmp_path, capsys):
    from orchestrator.cli import main

    uri, _, _ = ablation
    assert main(["report", "report-ablation", "--tracking-uri", uri, "--out", str(tmp_path)]) == 0
    assert "FoWKAL" in capsys.readouterr().out
    assert (tmp_path / "report.html").is_file()
    assert main(["report", "no-such-experiment", "--tracking-uri", uri, "--out", str(tmp_path)]) == 2
    assert "no-such-experiment" in capsys.readouterr().err


@pytest.fixture(scope="module")
def sweep(store):
    """A TPE-like sweep: the score is x (y is noise), so fANOVA must rank x far above y."""
    uri, client = store
    experiment_id = tracking.get_or_create_experiment(client, "report-sweep")
    parent = _parent(
        client,
        experiment_id,
        "smoke-tune-x",
        "tune",
        "val/wholebody_AP",
        "max",
        {tracking.TAG_SAMPLED: json.dumps(["loss.x", "loss.y"])},
    )
    space = {
        "parameters": {
            "loss.x": {"distribution": "uniform", "low": 0.0, "high": 1.0, "log": False, "choices": []},
            "loss.y": {"distribution": "loguniform", "low": 1e-3, "high": 1.0, "log": True, "choices": []},
        }
    }
    client.log_text(parent, json.dumps(space), tracking.SPACE_ARTIFACT)
    rng = np.random.default_rng(0)
    xs = rng.uniform(0, 1, 16)
    ys = np.exp(rng.uniform(np.log(1e-3), 0, 16))
    trials = []
    for i, (x, y) in enumerate(zip(xs, ys, strict=True), start=1):
        killed = i % 4 == 0
        history = (
            [{"val/wholebody_AP": float(x)}]
            if killed
            else [{"val/wholebody_AP": x / 3}, {"val/wholebody_AP": x}]
        )
        trials.append((f"tpe-{i:03d}", float(x), float(y), "KILLED" if killed else "FINISHED"))
        _child(
            client,
            experiment_id,
            parent,
            f"tpe-{i:03d}",
            {tracking.TAG_TRIAL_ID: f"t{i}"},
            {"loss.x": repr(float(x)), "loss.y": repr(float(y))},
            history,
            trials[-1][3],
        )
    # A failed trial has no score and must not be ranked.
    _child(client, experiment_id, parent, "tpe-017", {}, {"loss.x": "0.5", "loss.y": "0.1"}, [], "FAILED")
    tracking.end_run(parent, "FINISHED", client=client)
    return uri, client, parent, trials


def test_sweep_ranking_best_child_and_importances(sweep, tmp_path):
    uri, client, parent, trials = sweep
    record = report.load_sweep(client, parent)
    ranked = report.ranked_children(record)
    expected_order = [name for name, *_ in sorted(trials, key=lambda t: t[1], reverse=True)]
    assert [c.name for c in ranked] == expected_order
    assert "tpe-017" not in [c.name for c in ranked]
    by_name = {c.name: c for c in record.children}
    for name, x, y, _ in trials:
        assert by_name[name].score == pytest.approx(x)  # best over epochs: the last (x > x / 3)
        assert by_name[name].sampled == {"loss.x": pytest.approx(x), "loss.y": pytest.approx(y)}
    best = report.best_child(record)  # the best trial that trained to the end
    finished_order = [
        name for name, _, _, status in sorted(trials, key=lambda t: -t[1]) if status == "FINISHED"
    ]
    assert best.name == finished_order[0]

    importances = report.param_importances(record)
    assert set(importances) == {"loss.x", "loss.y"}
    assert sum(importances.values()) == pytest.approx(1.0)
    assert importances["loss.x"] > 0.8 > importances["loss.y"]

    paths = report.write_sweep_outputs(record, tmp_path)
    names = sorted(p.name for p in paths)
    assert names == ["importances.png", "parallel_coordinates.png", "summary.md"]
    for path in paths:
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (tmp_path / "summary.md").read_text()
    assert f"| 1 | {expected_order[0]} |" in summary
    assert "loss.x" in summary and "Importance" in summary
