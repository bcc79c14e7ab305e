# ctrstream: the two commands for a fresh machine are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ctrstream-installed

.PHONY: setup demo test test-fast stack-up stack-down bench clean

setup: $(STAMP)
	@$(VENV)/bin/ctrstream setup

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(not ((3, 11) <= sys.version_info[:2] <= (3, 12)))' \
	  || { echo "error: ctrstream supports Python 3.11 and 3.12 (bytewax 0.21 ships wheels up to 3.12);" \
	       "found $$($(PYTHON) -c 'import sys; print(sys.version.split()[0])') at $$(command -v $(PYTHON))." \
	       "Install 3.11 or 3.12 and run: make PYTHON=python3.12 ..."; exit 2; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q -e '.[train,dev]'
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/ctrstream demo

test: setup
	$(PY) -m pytest -p no:cacheprovider --timeout=900 $(PYTEST_ARGS)

stack-up: setup
	$(VENV)/bin/ctrstream stack up

stack-down:
	$(VENV)/bin/ctrstream stack down

clean:
	-$(VENV)/bin/ctrstream stack down
	rm -rf .stack .demo
