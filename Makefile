# One command for the main job, one for the tests; each sets itself up (venv, pip, apt data when root).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup data quickstart test test-fast clean

setup: $(STAMP)

# torch/torchvision pinned to the wheels on this machine's disk (other pins would download gigabytes)
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[test,transformers]"
	touch $@

# Fashion-MNIST from Debian (offline); needs root. Without it the quickstart says how to get it.
data:
	@if [ ! -f $(FMNIST) ]; then \
	  if [ "$$(id -u)" = 0 ]; then (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist); \
	  else echo "Fashion-MNIST missing: run 'sudo apt-get install dataset-fashion-mnist'"; fi; \
	fi

quickstart: setup data
	$(BIN)/structkit run configs/quickstart.yaml --out runs/quickstart

test: setup data
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf runs .pytest_cache
