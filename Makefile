# Two entry points for people (README): `make repro` and `make test`. Both set up first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup repro test test-e2e lint lineage clean

setup: $(STAMP)

# Idempotent and fast: re-installs only when pyproject.toml changed. The `ray` extra (the optional
# extract engine) is installed too, so that `make test` runs its tests.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,ray]'
	touch $(STAMP)

# dvc.yaml is generated from params.yaml and the code (`vmr dag`): regenerate, then run the DAG.
repro: setup
	source $(VENV)/bin/activate && vmr dag && dvc repro
	source $(VENV)/bin/activate && vmr report

test: setup
	$(PY) -m pytest -q -m "not slow"

test-e2e: setup
	$(PY) -m pytest -q -m slow

lint: setup
	$(VENV)/bin/ruff check .

# The DVC lineage check on a clean copy (also part of test-e2e).
lineage: setup
	$(PY) -m pytest -q -m slow tests/pipeline/test_lineage.py

clean:
	rm -rf work features vocab runs results data/synth
