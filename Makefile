# One-command setup for a fresh machine: `make demo` (setup + demo), `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
ARCH   := $(shell uname -m)

# torch/torchvision pairs known to install from this kind of machine's local wheel cache.
ifeq ($(ARCH),aarch64)
TORCH := torch==2.9.1 torchvision==0.24.1
else
TORCH := torch==2.14.1 torchvision==0.29.1
endif

.PHONY: setup demo test lint clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/labelrefine run --config configs/demo-digits.yaml --out runs/demo --overwrite

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check labelrefine tests

clean-venv:
	rm -rf $(VENV)
