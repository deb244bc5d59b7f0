# Two entry points for people (README): `make repro` and `make test`. Both set up first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup repro test test-e2e lint lineage clean

setup: $(STAMP)

# Idempotent and fast: re-installs only when pyproject.toml changed.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

repro: setup
	source $(VENV)/bin/activate && dvc repro
	source $(VENV)/bin/activate && vmr report

test: setup
	$(PY) -m pytest -q -m "not slow"

test-e2e: setup
	$(PY) -m pytest -q -m slow

lint: setup
	$(VENV)/bin/ruff check .

lineage: setup
	source $(VENV)/bin/activate && bash .ci/lineage_check.sh

clean:
	rm -rf work features vocab runs results data/synth
