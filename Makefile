# The two commands a new user runs: `make quickstart` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kdprune-installed

.PHONY: quickstart test install bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/kdprune experiment=quickstart

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) scripts/bench_data.py
	$(PY) scripts/bench_mask.py
	$(PY) scripts/bench_ingest.py

clean:
	rm -rf $(VENV) outputs build *.egg-info
