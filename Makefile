# wsi_mil: every stage is a target. The first target a newcomer runs creates .venv and installs everything.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SLIDES ?= demo_out/slides
OUT ?= out
CONFIG ?=
ARGS ?=
STAGE_ARGS = --out $(OUT) $(if $(CONFIG),--config $(CONFIG)) $(ARGS)

.PHONY: help venv test lint demo bench tile extract train predict heatmap run clean

help:  ## list the targets
	@echo "wsi_mil targets (variables: SLIDES=folder|csv OUT=folder CONFIG=file.yaml ARGS='key=value ...')"
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{ printf "  make %-9s %s\n", $$1, $$2 }'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,distributed]'
	touch $@

venv: $(VENV)/.installed  ## create .venv and install the package with dev extras

lint: venv  ## ruff
	$(VENV)/bin/ruff check wsi_mil pipelines tests

test: venv  ## lint, then the whole test suite
	$(VENV)/bin/ruff check wsi_mil pipelines tests
	$(VENV)/bin/pytest -q

demo: venv  ## whole pipeline on generated synthetic slides (demo_out/)
	$(PY) pipelines/demo.py --out demo_out $(ARGS)

bench: venv  ## throughput figures (see docs/benchmarks.md)
	$(PY) pipelines/bench.py $(ARGS)

tile: venv  ## stage 1: tissue + patch coords  (SLIDES=, OUT=)
	$(PY) pipelines/tile.py --slides $(SLIDES) $(STAGE_ARGS)

extract: venv  ## stage 2: features with a timm encoder  (SLIDES=, OUT=)
	$(PY) pipelines/extract.py --slides $(SLIDES) $(STAGE_ARGS)

train: venv  ## stage 3: attention MIL with cross-validation  (OUT=, ARGS='train.labels=labels.csv')
	$(PY) pipelines/train.py $(STAGE_ARGS)

predict: venv  ## apply a trained run to features  (OUT=)
	$(PY) pipelines/predict.py $(STAGE_ARGS)

heatmap: venv  ## stage 4: attention heatmaps and exports  (SLIDES=, OUT=)
	$(PY) pipelines/heatmap.py --slides $(SLIDES) $(STAGE_ARGS)

run: venv  ## tile -> extract -> predict (or train) -> heatmap on new slides  (SLIDES=, OUT=)
	$(PY) pipelines/run.py --slides $(SLIDES) $(STAGE_ARGS)

clean:  ## remove outputs of demo and bench (keeps .venv)
	rm -rf demo_out .bench out .pytest_cache
