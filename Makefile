# ctrstream: the two commands for a fresh machine are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ctrstream-installed

.PHONY: setup demo test test-unit test-integration lint fmt stack-up stack-down clean

setup: $(STAMP)
	@$(VENV)/bin/ctrstream setup

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(not ((3, 11) <= sys.version_info[:2] <= (3, 12)))' \
	  || { echo "error: ctrstream supports Python 3.11 and 3.12 (bytewax 0.21 ships wheels up to 3.12);" \
	       "found $$($(PYTHON) -c 'import sys; print(sys.version.split()[0])') at $$(command -v $(PYTHON))." \
	       "Install 3.11 or 3.12 and run: make PYTHON=python3.12 ..."; exit 2; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q -e '.[train,dev,spark]'
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/ctrstream demo

# the suite (unit tests: no servers, seconds; integration tests: real Kafka, Redis, Triton),
# then the habits (ruff, mypy, the layer test); fails when either fails, pytest's code first
test: setup
	@rc=0; $(PY) -m pytest -p no:cacheprovider --timeout=900 tests/unit tests/integration $(PYTEST_ARGS) || rc=$$?; \
	  $(MAKE) --no-print-directory lint || { [ $$rc -ne 0 ] || rc=3; }; exit $$rc

test-unit: setup
	$(PY) -m pytest -p no:cacheprovider --timeout=300 tests/unit $(PYTEST_ARGS)

test-integration: setup
	$(PY) -m pytest -p no:cacheprovider --timeout=900 tests/integration $(PYTEST_ARGS)

# ruff (lint + format check), mypy over the namespace, the layer test
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) .ci/typecheck.py
	$(PY) -m pytest -p no:cacheprovider -q tests/unit/test_layers.py

fmt: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

stack-up: setup
	$(VENV)/bin/ctrstream stack up

stack-down:
	$(VENV)/bin/ctrstream stack down

clean:
	-$(VENV)/bin/ctrstream stack down
	rm -rf .stack .demo
