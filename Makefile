# The two commands a new user runs: `make quickstart` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kdprune-installed
# The sweep extras (Optuna sweeper, Ray and submitit launchers) get a second environment, so the main one stays
# what `pip install '.[test]'` gives; their tests (marked `extras`) run there and fail, not skip, when a plugin
# is missing (KDPRUNE_REQUIRE_EXTRAS=1).
EXTRAS_VENV ?= .venv-extras
EXTRAS_PY := $(EXTRAS_VENV)/bin/python
EXTRAS_STAMP := $(EXTRAS_VENV)/.kdprune-installed
# pytest-xdist workers for the main suite: one per core (`make test TEST_WORKERS=0` runs it in one process).
TEST_WORKERS ?= auto

.PHONY: quickstart test test-extras install install-extras bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

install-extras: $(EXTRAS_STAMP)

$(EXTRAS_STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(EXTRAS_VENV)
	$(EXTRAS_PY) -m pip install -q --upgrade pip
	$(EXTRAS_PY) -m pip install -q -c constraints.txt -e ".[test,optuna,ray,slurm]"
	touch $(EXTRAS_STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/kdprune experiment=quickstart

# Pyflakes and the size rules (pyproject.toml's [tool.ruff]), the main suite, then the sweep tools' tests in the
# extras environment. The main suite runs one pytest-xdist worker per core: each test process and the kdprune
# processes it starts use one torch thread (tests/conftest.py), so the cores are otherwise mostly idle; worksteal
# evens out the tests of very different lengths.
test: $(STAMP)
	$(VENV)/bin/ruff check kdprune_cli tests scripts
	$(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal
	$(MAKE) test-extras

# Ray and submitit_local sweeps and an Optuna search on the quickstart (debug=default), one job at a time.
test-extras: $(EXTRAS_STAMP)
	KDPRUNE_REQUIRE_EXTRAS=1 OMP_NUM_THREADS=1 RAY_ADDRESS= $(EXTRAS_PY) -m pytest -m extras

bench: $(STAMP)
	$(PY) scripts/bench_data.py
	$(PY) scripts/bench_mask.py
	$(PY) scripts/bench_ingest.py

clean:
	rm -rf $(VENV) $(EXTRAS_VENV) outputs build *.egg-info
