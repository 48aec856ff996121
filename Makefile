# One command for the main job, one for the tests; each sets itself up (venv, pip, apt data when root).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
AUSTEN := /usr/lib/R/site-library/janeaustenr/data/Rdata.rdb
APT_DATA := dataset-fashion-mnist r-cran-janeaustenr

.PHONY: setup data quickstart quickstart-target test test-fast clean

setup: $(STAMP)

# torch/torchvision pinned to the wheels on this machine's disk (other pins would download gigabytes)
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[test,transformers]"
	touch $@

# Data from Debian (offline at run time): Fashion-MNIST and Jane Austen's novels; needs root.
# Without root it says what to install; the tests that need the data then skip.
data:
	@if [ ! -f $(FMNIST) ] || [ ! -f $(AUSTEN) ]; then \
	  if [ "$$(id -u)" = 0 ]; then (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_DATA) >/dev/null); \
	  else echo "missing data: run 'sudo apt-get install $(APT_DATA)'"; fi; \
	fi

quickstart: setup data
	$(BIN)/structkit run configs/quickstart.yaml --out runs/quickstart --resume

# the quickstart aimed at half the dense MACs (compress.target), 3 training + 1 fine-tuning epochs
quickstart-target: setup data
	$(BIN)/structkit run configs/quickstart_target.yaml --out runs/quickstart_target --resume

test: setup data
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf runs .pytest_cache
