"""`fowkal report`: sweeps and ablations read back from MLflow (a SQLite store filled by hand, no Ray).

The expected numbers are computed in the tests with NumPy from the values the test itself logged.
"""

from __future__ import annotations

import base64
import dataclasses
import json

import numpy as np
import pytest
from report_store import (
    BEST_EPOCH,
    DESCRIPTION,
    EPOCHS,
    OWN_ARMS,
    OWN_BEST_AP,
    SEEDS,
    epoch_metrics,
    make_child,
    make_parent,
    own_ablation,
)

from orchestrator import tracking
from orchestrator.reports import report

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


@pytest.fixture(scope="module")
def ablation(store):
    uri, client = store
    experiment_id = tracking.get_or_create_experiment(client, "report-ablation")
    parent = make_parent(client, experiment_id, "smoke-ablate-x", "ablate", "val/wholebody_AP", "max")
    client.log_text(parent, json.dumps(ARMS), tracking.ARMS_ARTIFACT)
    for (arm, seed), final in FINAL.items():
        status = "KILLED" if (arm, seed) == ("f", 2) else "FINISHED"
        name = {"a": "mse", "f": "fowkal"}[arm] + f"-s{seed}"
        earlier = {key: value / 2 for key, value in final.items()}  # an earlier eval epoch: not reported
        make_child(
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
    # The ablation bars and the learning curves, embedded; arm (f) is KAL-family but logged no KAF figure.
    assert page.count("data:image/png;base64,") == 2
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
    parent = make_parent(
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
        make_child(
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
    make_child(client, experiment_id, parent, "tpe-017", {}, {"loss.x": "0.5", "loss.y": "0.1"}, [], "FAILED")
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
        assert by_name[name].score == pytest.approx(100 * x)  # percent; best epoch: the last (x > x / 3)
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
    assert names == ["importances.png", "learning_curves.png", "parallel_coordinates.png", "summary.md"]
    for path in paths:
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (tmp_path / "summary.md").read_text()
    assert f"| 1 | {expected_order[0]} |" in summary
    assert "loss.x" in summary and "Importance" in summary


# ------------------------------------------------------------------------------------------------------------
# One's own ablation (report_store.own_ablation): best epochs, paired differences, curves, KAF, links


T_975_DOF2 = 4.302652729911275  # Student t, 0.975 quantile, 2 degrees of freedom (tables)


@pytest.fixture(scope="module")
def own(store, tmp_path_factory):
    uri, client = store
    logged = own_ablation(client, "report-own", tmp_path_factory.mktemp("own_kaf"))
    return uri, client, logged, report.load_sweep(client, logged["parent"])


def test_best_epoch_metrics_and_which_epoch(own):
    _, _, _, record = own
    rows = {row.key: row for row in report.ablation_rows(record)}
    for arm, values in OWN_BEST_AP.items():
        # The best epoch's value (epoch 3), not the last epoch's (0.9 of it).
        assert rows[arm].mean["wholebody_AP"] == pytest.approx(100 * np.mean(values))
        assert rows[arm].best_epochs == [(s, BEST_EPOCH, EPOCHS) for s in SEEDS]
    child = next(c for c in record.children if c.name == "d-kal-s0")
    assert child.best_epoch == BEST_EPOCH and child.epochs == EPOCHS
    assert child.last_metrics["val/wholebody_AP"] == pytest.approx(100 * 0.9 * OWN_BEST_AP["d"][0])  # percent
    markdown = report.ablation_markdown(list(rows.values()))
    assert "Best epoch" in markdown and f"| 3, 3, 3 of {EPOCHS} |" in markdown


def test_own_arms_have_no_paper_column(own):
    _, _, _, record = own
    rows = report.ablation_rows(record)
    assert all(row.paper == {} for row in rows)
    markdown = report.ablation_markdown(rows)
    assert "paper" not in markdown.lower()
    mean, std = 100 * np.mean(OWN_BEST_AP["d"]), 100 * np.std(OWN_BEST_AP["d"], ddof=1)
    assert f"| {mean:.2f} ± {std:.2f} |" in markdown  # the cell without "(paper)"
    assert "(—)" not in markdown
    figure = report.ablation_figure(rows)
    assert len(figure.axes) == 1  # no paper panel


def test_paired_differences_with_student_t_interval(own):
    _, _, _, record = own
    diffs = {(d.key, d.metric): d for d in report.paired_differences(record)}
    assert {key for key, _ in diffs} == {"d", "e", "f"}  # every arm but the baseline
    for arm, expect_zero in (("d", False), ("e", True)):
        d = 100 * (np.array(OWN_BEST_AP[arm]) - np.array(OWN_BEST_AP["a"]))
        half = T_975_DOF2 * d.std(ddof=1) / np.sqrt(len(d))
        diff = diffs[arm, "wholebody_AP"]
        assert diff.seeds == list(SEEDS)
        assert diff.mean == pytest.approx(d.mean())
        assert (diff.low, diff.high) == (pytest.approx(d.mean() - half), pytest.approx(d.mean() + half))
        assert diff.contains_zero is expect_zero
    assert diffs["d", "wholebody_AR"].mean is None  # no AR logged: no pair

    markdown, page = report.render_report(record, "sqlite:///x.db", client=own[1])
    section = markdown.split("## Paired differences to (a)", 1)[1].split("##", 1)[0]
    d_line = next(line for line in section.splitlines() if line.startswith("| (d) my KAL"))
    e_line = next(line for line in section.splitlines() if line.startswith("| (e) my WAHR"))
    assert "(contains 0)" in e_line.split("|")[3] and "(contains 0)" not in d_line.split("|")[3]
    assert "single runs" not in section
    assert 'class="contains-zero"' in page


def test_one_seed_says_the_deltas_are_single_runs(own):
    _, client, _, record = own
    one = dataclasses.replace(record, children=[c for c in record.children if c.seed == 0])
    markdown, _ = report.render_report(one, "sqlite:///x.db", client=client)
    section = markdown.split("## Paired differences to (a)", 1)[1].split("##", 1)[0]
    assert "difference of two single runs" in section and "[" not in section
    assert "single runs (n = 1)" in markdown
    assert "±" not in report.ablation_figure(report.ablation_rows(one))._suptitle.get_text()


def test_learning_curves_are_the_mean_over_seeds(own):
    _, _, _, record = own
    curves = {curve.label: curve for curve in report.arm_curves(record)}
    assert list(curves) == ["(a) mse", "(d) kal", "(e) hwahr", "(f) fowkal"]
    for arm in OWN_ARMS:
        curve = curves[f"({arm['key']}) {arm['name']}"]
        expected = [
            100 * np.mean([epoch_metrics(v, e)["val/wholebody_AP"] for v in OWN_BEST_AP[arm["key"]]])
            for e in range(1, EPOCHS + 1)
        ]
        assert curve.epochs == list(range(1, EPOCHS + 1)) and curve.n == [3] * EPOCHS
        assert curve.values == pytest.approx(expected)


def test_kaf_figure_of_every_kal_arm_from_its_first_seed(own, tmp_path):
    uri, client, logged, record = own
    figures = {f.arm_key: f for f in report.kaf_figures(client, record, tmp_path)}
    assert list(figures) == ["d", "f"]  # kal and fowkal; mse and heuristic_wahr have no KAF
    assert figures["d"].run_name == "d-kal-s0"
    assert figures["d"].path.read_bytes() == logged["kaf_pngs"][0].read_bytes()  # seed 0's, not seed 1's
    assert figures["f"].run_name == "f-fowkal-s0" and figures["f"].path is None

    md_path, html_path = report.write_report("report-own", tracking_uri=uri, out_dir=tmp_path / "out")
    markdown, page = md_path.read_text(), html_path.read_text()
    assert "![kaf-d](figures/kaf-d.png)" in markdown and (tmp_path / "out/figures/kaf-d.png").is_file()
    assert "`kaf_history.png` of run [d-kal-s0](" in markdown
    assert "(f) my FoWKAL: run [f-fowkal-s0](" in markdown and "logged no `kaf_history.png`" in markdown
    assert base64.b64encode(logged["kaf_pngs"][0].read_bytes()).decode() in page


def test_setup_links_code_spans_and_absolute_store(own, tmp_path, monkeypatch):
    _, client, logged, record = own
    monkeypatch.chdir(tmp_path)
    markdown, page = report.render_report(record, "sqlite:///runs/smoke/mlflow.db", client=client)
    absolute = f"sqlite:///{tmp_path.resolve()}/runs/smoke/mlflow.db"
    assert f"`{absolute}`" in markdown and f"<code>{absolute}</code>" in page
    assert "sqlite:///runs/smoke" not in page
    assert "`" not in page  # code spans are <code>, never literal backticks
    assert f"--backend-store-uri {absolute} --host 127.0.0.1 --port 5000" in page
    for (arm, seed), run_id in logged["runs"].items():
        url = f"http://127.0.0.1:5000/#/experiments/{logged['experiment_id']}/runs/{run_id}"
        assert f'<a href="{url}"><code>{run_id}</code></a>' in page, (arm, seed)
    # The setup: the parent's description and a table of data, model, input size, epochs and seeds.
    assert DESCRIPTION in markdown
    for row in (
        "| Data | synthetic, COCO-WholeBody format (256 training / 32 validation images) |",
        "| Model | `hrnet_w18_small` |",
        "| Input size | 96×128 (w × h) |",
        f"| Epochs | {EPOCHS} |",
        "| Seeds | 3 (0, 1, 2) |",
    ):
        assert row in markdown
    runs = markdown.split("## Runs", 1)[1]
    assert f"| d-kal-s0 | FINISHED | {BEST_EPOCH} | {EPOCHS} |" in runs

    # A tracking server: its own URL is the UI, and no `mlflow ui` command is printed.
    _, page = report.render_report(record, "http://127.0.0.1:5999/", client=client)
    parent = logged["parent"]
    assert f'href="http://127.0.0.1:5999/#/experiments/{logged["experiment_id"]}/runs/{parent}"' in page
    assert "mlflow ui" not in page


def test_report_by_sweep_name_and_an_ambiguous_name(own, store, tmp_path, capsys):
    from orchestrator.cli import main

    uri, client = store
    assert report.resolve_parent_runs(client, "own-ablate") == [own[2]["parent"]]
    assert main(["report", "own-ablate", "--tracking-uri", uri, "--out", str(tmp_path)]) == 0
    assert "Ablation own-ablate" in (tmp_path / "report.md").read_text()
    twins = []
    for experiment in ("report-twin-1", "report-twin-2"):
        experiment_id = tracking.get_or_create_experiment(client, experiment)
        twins.append(make_parent(client, experiment_id, "twin-ablate", "ablate"))
        tracking.end_run(twins[-1], "FINISHED", client=client)
    with pytest.raises(report.ReportError) as err:
        report.resolve_parent_runs(client, "twin-ablate")
    message = str(err.value)
    assert "ambiguous" in message and all(run_id in message for run_id in twins)
    assert "report-twin-1" in message and "report-twin-2" in message
    assert sorted(report.resolve_parent_runs(client, "twin-ablate", newest_only=False)) == sorted(twins)
    assert main(["report", "twin-ablate", "--tracking-uri", uri, "--out", str(tmp_path)]) == 2
    assert twins[0] in capsys.readouterr().err
    # A child's run name is no sweep.
    with pytest.raises(report.ReportError, match="a-mse-s0"):
        report.resolve_parent_runs(client, "a-mse-s0")


def test_ablation_figure_panels_labels_legend_and_title(own):
    _, _, _, record = own
    rows = report.ablation_rows(record)
    for row in rows:  # the paper's ~60% beside ours (10-18% here)
        row.paper = {"wholebody_AP": 60.0, "body_AP": 70.0}
    figure = report.ablation_figure(rows)
    ours, paper = figure.axes
    assert [t.get_text() for t in ours.get_xticklabels()] == ["(a)", "(d)", "(e)", "(f)"]
    assert [t.get_text() for t in paper.get_xticklabels()] == ["(a)", "(d)", "(e)", "(f)"]
    # Each panel on its own scale: ours is not squeezed under the paper's bars.
    highest_ours = max(row.mean["body_AP"] + row.std["body_AP"] for row in rows)
    assert highest_ours < ours.get_ylim()[1] < 2 * highest_ours
    assert paper.get_ylim()[1] > 70
    assert "± std" in figure._suptitle.get_text()  # 3 seeds
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    legend = figure.legends[0].get_window_extent(renderer)
    for ax in figure.axes:
        assert not legend.overlaps(ax.get_window_extent(renderer))  # outside the panels, so off the bars
        assert ax.patches and not any(legend.overlaps(p.get_window_extent(renderer)) for p in ax.patches)


PIXEL_PNG = (  # a 1x1 PNG
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


def test_figures_of_one_group_sit_side_by_side(tmp_path):
    png = tmp_path / "x.png"
    png.write_bytes(base64.b64decode(PIXEL_PNG))
    blocks = [
        report.Block("figure", "first", path=png, group="kaf"),
        report.Block("figure", "second", path=png, group="kaf"),
        report.Block("p", "after"),
        report.Block("figure", "alone", path=png),
    ]
    body = report.blocks_html_body("t", blocks)
    gallery = body.split('<div class="gallery kaf">', 1)[1].split("</div>", 1)[0]
    assert gallery.count("<figure>") == 2 and "after" not in gallery
    assert body.count('<div class="gallery') == 1 and body.count("<figure>") == 3
    assert ".gallery{display:flex" in report.html_page("t", body)


def test_sweep_report_ranks_explains_and_links(sweep, tmp_path):
    uri, client, parent, trials = sweep
    md_path, html_path = report.write_report(
        "smoke-tune-x", tracking_uri=uri, out_dir=tmp_path, print_fn=lambda _: None
    )
    markdown, page = md_path.read_text(), html_path.read_text()
    best = max(trials, key=lambda t: t[1])
    assert f"| 1 | {best[0]} |" in markdown
    assert "Optuna fANOVA" in markdown and "loss.x" in markdown
    for name in ("importances", "parallel_coordinates", "learning_curves"):
        assert (
            f"]({report.FIGURES_DIR}/{name}.png)" in markdown
            and (tmp_path / "figures" / f"{name}.png").is_file()
        )
    assert page.count("data:image/png;base64,") == 3
    record = report.load_sweep(client, parent)
    assert len(markdown.split("## Runs", 1)[1].strip().splitlines()) == 2 + len(record.children)
    for child in record.children:
        assert f"/#/experiments/{record.experiment_id}/runs/{child.run_id}" in page


def test_percent_runs_and_fraction_runs_of_earlier_versions_read_alike(store):
    """Today's runs log AP in percent (fowkal.metric_unit=percent); runs of versions before 0.2 logged
    fractions (tag fraction, or no tag at all). The report reads all of them in percent."""
    _, client = store
    experiment_id = tracking.get_or_create_experiment(client, "report-units")
    parent = make_parent(client, experiment_id, "units-sweep", "tune")
    history = [{"val/wholebody_AP": 12.5, "val/body_AP": -1.0, "train/loss": 0.5}]
    make_child(client, experiment_id, parent, "percent", {}, {}, history, "FINISHED", unit="percent")
    history = [{"val/wholebody_AP": 0.125, "val/body_AP": -1.0, "train/loss": 0.5}]
    make_child(client, experiment_id, parent, "fraction", {}, {}, history, "FINISHED")
    untagged = make_child(client, experiment_id, parent, "untagged", {}, {}, history, "FINISHED")
    client.delete_tag(untagged, tracking.TAG_METRIC_UNIT)
    record = report.load_sweep(client, parent)
    assert {c.name for c in record.children} == {"percent", "fraction", "untagged"}
    for child in record.children:
        assert child.metrics["val/wholebody_AP"] == pytest.approx(12.5), child.name
        assert child.score == pytest.approx(12.5) and child.curve == {1: pytest.approx(12.5)}
        assert child.metrics["val/body_AP"] == -1.0  # no ground truth stays -1
        assert child.metrics["train/loss"] == 0.5  # not an AP: unchanged
