# wsi_mil: every stage is a target. The first target a newcomer runs creates .venv and installs everything.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SLIDES ?= demo_out/slides
OUT ?= out
CONFIG ?=
ARGS ?=
FORMAT ?= clam
TO ?= $(OUT)/export_$(FORMAT)
STAGE_ARGS = --out $(OUT) $(if $(CONFIG),--config $(CONFIG)) $(ARGS)

.PHONY: help venv test lint demo bench tile extract train predict heatmap run export config clean

help:  ## list the targets
	@echo "wsi_mil targets (variables: SLIDES=folder|csv OUT=folder CONFIG=file.yaml ARGS='key=value ...')"
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{ printf "  make %-9s %s\n", $$1, $$2 }'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,distributed]'
	touch $@

venv: $(VENV)/.installed  ## create .venv and install the package with dev extras

lint: venv  ## ruff, and the layering contracts in pyproject.toml (import-linter)
	$(VENV)/bin/ruff check wsi_mil pipelines tests
	$(VENV)/bin/lint-imports

test: lint  ## lint, then the whole test suite
	$(VENV)/bin/pytest -q

demo: venv  ## whole pipeline on generated synthetic slides (demo_out/)
	$(PY) pipelines/demo.py --out demo_out $(ARGS)

bench: venv  ## throughput figures (see docs/benchmarks.md)
	$(PY) pipelines/bench.py $(ARGS)

WSI_MIL := $(VENV)/bin/wsi-mil

tile: venv  ## stage 1: tissue + patch coords  (SLIDES=, OUT=)
	$(WSI_MIL) tile --slides $(SLIDES) $(STAGE_ARGS)

extract: venv  ## stage 2: features with a timm encoder  (SLIDES=, OUT=)
	$(WSI_MIL) extract --slides $(SLIDES) $(STAGE_ARGS)

train: venv  ## stage 3: attention MIL with cross-validation  (OUT=, ARGS='train.labels=labels.csv')
	$(WSI_MIL) train $(STAGE_ARGS)

predict: venv  ## apply a trained run to features  (OUT=)
	$(WSI_MIL) predict $(STAGE_ARGS)

heatmap: venv  ## stage 4: attention heatmaps and exports  (SLIDES=, OUT=)
	$(WSI_MIL) heatmap --slides $(SLIDES) $(STAGE_ARGS)

run: venv  ## tile -> extract -> predict (or train) -> heatmap on new slides  (SLIDES=, OUT=)
	$(WSI_MIL) run --slides $(SLIDES) $(STAGE_ARGS)

export: venv  ## features + patches in another tool's layout  (OUT=, FORMAT=clam|trident|torchmil, TO=)
	$(WSI_MIL) export --format $(FORMAT) --to $(TO) $(STAGE_ARGS)

config: venv  ## print the effective config as commented YAML  (CONFIG=, ARGS=)
	$(WSI_MIL) config $(if $(CONFIG),--config $(CONFIG)) $(ARGS)

clean:  ## remove outputs of demo and bench (keeps .venv)
	rm -rf demo_out .bench out .pytest_cache
