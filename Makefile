# Two commands on a fresh clone: `make demo` and `make test`. Both build .venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(VENV)/.installed  ## server + agent + sample app on the embedded defaults
	$(PY) examples/demo.py

test: $(VENV)/.installed  ## the whole test suite (lint included)
	$(VENV)/bin/ruff check comzy tests examples bench
	$(PY) -m pytest

bench: $(VENV)/.installed  ## the benchmark harness (docs/benchmarks.md); results in bench/results/
	$(PY) -m bench

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check comzy tests examples bench
