# Two commands on a fresh clone: `make train` and `make test`.
# The data: CIFAR10_ROOT=/path/holding/cifar-10-batches-py (else ./data, downloaded when online).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# mlflow run/serve --env-manager local run the first `python` on PATH: make it the venv's.
export PATH := $(abspath $(BIN)):$(PATH)
export NO_ALBUMENTATIONS_UPDATE := 1

OVERRIDES ?=

.PHONY: setup train test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[dev]"
	touch $@

train: setup
	$(BIN)/mlflow run . -e train --env-manager local $(if $(OVERRIDES),-P overrides="$(OVERRIDES)")

test: setup
	$(BIN)/python -m pytest

# CPU training throughput of every model: the project's loop against a plain reference loop.
bench: setup
	$(BIN)/python scripts/bench_throughput.py

# Not checkpoints/: a finished run deletes its own folder, so what is left there is a
# killed run's last.pt, waiting for resume=<run id>.
clean:
	rm -rf outputs multirun .pytest_cache
