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
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "ctrstream needs Python >= 3.11, found " + sys.version.split()[0]' \
	  || { echo "error: install Python 3.11 or newer (python3 on the PATH)"; exit 2; }
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
