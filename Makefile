# One-command runs. `make stage1 stage2 sample evaluate` trains the default pipeline into runs/mnist/;
# `make test` runs the test suite. Both create .venv and install everything on first use.
#
#   CONFIG  the YAML preset                      (default configs/mnist.yaml)
#   RUN     the run folder                       (default runs/<config file stem>)
#   ARGS    space-separated key=value overrides, and/or --fresh / --debug
#   TORCH   the PyTorch requirement: torch==2.13.0 is the CPU build here; GPU users set e.g.
#           TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
#   QUICK   make bench QUICK=1: the short benchmark
#   TEST_JOBS  make test's pytest processes, each test file on one of them (default 2; 0 = in this process)
#
# Paths may hold spaces: make stage1 RUN="runs/my run" CONFIG="configs/my preset.yaml"

PYTHON ?= python3
TORCH ?= torch==2.13.0
CONFIG ?= configs/mnist.yaml
RUN ?=
ARGS ?=
QUICK ?=
TEST_JOBS ?= 2

VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# the run folder defaults to runs/<config file stem> in the stages themselves, so paths with spaces need no make
# functions; CONFIG and RUN are quoted, ARGS is split on spaces on purpose
STAGE = $(PY) -m stages.$(1) --config "$(CONFIG)" $(if $(RUN),--run "$(RUN)",) $(ARGS)

.PHONY: help install emoji-data data stage1 stage2 sample evaluate sweep demo tensorboard plan test lint bench curve clean

help:
	@sed -n '1,/^$$/p' Makefile | sed 's/^# \{0,1\}//'
	@echo "targets: install emoji-data data stage1 stage2 sample evaluate sweep demo tensorboard plan test lint bench curve clean"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	# clean-fid's resize is the reference of the Inception preprocessing test; without --no-deps its torchvision
	# requirement would replace the pinned torch
	$(PY) -m pip install --quiet --no-deps clean-fid==0.1.35
	touch $@

install: $(STAMP)

# the class folders of configs/emoji.yaml, from the npm package emoji-datasource-google (needs npm)
emoji-data: $(STAMP)
	$(PY) scripts/emoji_folders.py data/emoji

data: $(STAMP)
	$(call STAGE,data)

stage1: $(STAMP)
	$(call STAGE,stage1)

stage2: $(STAMP)
	$(call STAGE,stage2)

sample: $(STAMP)
	$(call STAGE,sample)

evaluate: $(STAMP)
	$(call STAGE,evaluate)

sweep: $(STAMP)
	$(call STAGE,sweep)

# the web page of RUN/sampler (make sample first): http://127.0.0.1:7860; ARGS="--port 7861" for other flags
demo: $(STAMP)
	config="$(CONFIG)"; stem="$${config##*/}"; run="$(RUN)"; \
	$(PY) -m pipeline.demo --sampler "$${run:-runs/$${stem%.*}}/sampler" $(ARGS)

# the training curves and reconstruction grids of stages 1 and 2 of the run, at http://127.0.0.1:6006
tensorboard: $(STAMP)
	config="$(CONFIG)"; stem="$${config##*/}"; run="$(RUN)"; \
	$(PY) -m tensorboard.main --host 127.0.0.1 --port $(or $(PORT),6006) --logdir "$${run:-runs/$${stem%.*}}"

# CONFIG's GPU plan on paper: memory per GPU, throughput, sampling (ARGS: key=value, --gpu a100, --mfu 0.3, ...)
plan: $(STAMP)
	$(PY) -m pipeline.plan --config "$(CONFIG)" $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile

lint: $(STAMP)
	$(PY) -m ruff check pipeline stages tests bench scripts

bench: $(STAMP)
	$(PY) -m bench.run $(if $(QUICK),--quick,)

# Inception FID against CPU minutes, one knob of CONFIG at a time (40-90 CPU minutes a variant, two side by side; ARGS: --only, --jobs)
curve: $(STAMP)
	$(PY) -m bench.curve --config "$(CONFIG)" $(ARGS)

clean:
	rm -rf runs bench/results.json
