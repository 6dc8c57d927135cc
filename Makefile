# Two commands a newcomer needs (see README): `make demo` and `make test`.
# Each creates .venv on first use; later runs reuse it until pyproject.toml or constraints.txt change.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	# PostgreSQL for the tracking-server test (tests/test_cluster_storage.py), from Debian when missing.
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || \
		{ apt-get update && apt-get install -y postgresql; }
	# Headless Chromium for the report.html test (tests/test_report_browser.py), from Debian when missing.
	command -v chromium || (apt-get update && apt-get install -y chromium)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt pip setuptools wheel numpy cython
	# xtcocotools' wheel is built against numpy 1: build it from source against our numpy.
	$(BIN)/pip install -q -c constraints.txt --no-build-isolation --no-binary xtcocotools xtcocotools
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

# The paper's ablation (Tables 2-3: 8 arms x 1 seed) on the embedded default: synthetic data, local Ray,
# SQLite MLflow under runs/smoke/. A second `make demo` continues (or just re-reports) the same sweep.
demo: $(STAMP)
	$(BIN)/fowkal ablate --config configs/smoke.yaml --arms search_spaces/ablation_paper.yaml --seeds 1 \
		--name smoke-ablate-demo
	$(BIN)/fowkal report fowkal-ablate --out runs/smoke/report

# What CI runs (.ci/run): lint, format check, every test (the slow end-to-end ones included).
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q --durations=25

# The edit-test loop: everything but the slow end-to-end runs (Ray clusters, sweeps, full trainings).
test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not slow"

# Benchmarks (quick settings; figures go into bench/RESULTS.md by hand, see each script's docstring).
bench: $(STAMP)
	$(BIN)/python bench/losses.py --quick
	$(BIN)/python bench/data.py --quick
	$(BIN)/python bench/train_throughput.py --quick
	$(BIN)/python bench/tune.py --quick

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean-venv:
	rm -rf $(VENV)
