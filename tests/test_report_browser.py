"""report.html as a person sees it: rendered by headless Chromium (Debian's ``chromium``, driven by
Playwright's Python API; no browser download), from a small fake MLflow store (no Ray, no training)."""

from __future__ import annotations

import shutil

import pytest
from report_store import OWN_ARMS, own_ablation

from orchestrator import tracking
from orchestrator.reports import report

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (make setup installs it when missing)"
)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the test extra) is missing")
    tmp = tmp_path_factory.mktemp("report_browser")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    logged = own_ablation(tracking.make_client(uri), "report-browser", tmp / "kaf")
    _, html_path = report.write_report(
        "own-ablate", tracking_uri=uri, out_dir=tmp / "report", print_fn=lambda _: None
    )
    with sync_api.sync_playwright() as playwright:
        # --no-sandbox: Chromium's sandbox refuses to start as root (CI runs as root).
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(html_path.as_uri(), wait_until="load")
            seen = {
                "tables": page.eval_on_selector_all(
                    "table",
                    "ts => ts.map(t => ({head: [...t.querySelectorAll('th')].map(h => h.innerText),"
                    " rows: [...t.querySelectorAll('tbody tr')].map(r =>"
                    " [...r.querySelectorAll('td')].map(c => c.innerText))}))",
                ),
                "images": page.eval_on_selector_all(
                    "figure img",
                    "is => is.map(i => ({alt: i.alt, complete: i.complete, width: i.naturalWidth,"
                    " height: i.naturalHeight, shown: i.getBoundingClientRect().width}))",
                ),
                "links": page.eval_on_selector_all(
                    "a", "as => as.map(a => ({href: a.href, text: a.innerText}))"
                ),
                "codes": page.eval_on_selector_all("code", "cs => cs.length"),
                "text": page.inner_text("body"),
            }
        finally:
            browser.close()
    return seen, logged


def test_the_tables_render(rendered):
    seen, _ = rendered
    ablation = next(t for t in seen["tables"] if "Best epoch" in t["head"] and "Whole-body AP" in t["head"])
    assert [row[0] for row in ablation["rows"]] == [arm["label"] for arm in OWN_ARMS]
    assert all(row[2] == "3, 3, 3 of 4" for row in ablation["rows"])
    paired = next(t for t in seen["tables"] if "pairs (seeds)" in t["head"])
    assert [row[0] for row in paired["rows"]] == [arm["label"] for arm in OWN_ARMS[1:]]
    runs = next(t for t in seen["tables"] if "MLflow run" in t["head"])
    assert len(runs["rows"]) == len(OWN_ARMS) * 3


def test_the_figures_decode(rendered):
    seen, _ = rendered
    images = {image["alt"]: image for image in seen["images"]}
    assert set(images) == {"ablation", "learning_curves", "kaf-d"}
    for alt, image in images.items():
        # A broken data: URI leaves naturalWidth at 0.
        assert image["complete"] and image["width"] > 0 and image["height"] > 0, alt
        assert image["shown"] > 0, alt


def test_the_links_point_at_the_runs_in_mlflow(rendered):
    seen, logged = rendered
    hrefs = {link["href"] for link in seen["links"]}
    base = f"http://127.0.0.1:5000/#/experiments/{logged['experiment_id']}"
    for run_id in [logged["parent"], *logged["runs"].values()]:
        assert f"{base}/runs/{run_id}" in hrefs
    assert f"{base}/runs?workflowType=machine_learning" in hrefs
    assert seen["codes"] > 0 and "`" not in seen["text"]  # code spans rendered, no literal backticks
