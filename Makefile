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

.PHONY: help venv viewer-assets browser dicom-tools test lint demo bench tile extract train predict evaluate heatmap run export view config clean

help:  ## list the targets
	@echo "wsi_mil targets (variables: SLIDES=folder|csv OUT=folder CONFIG=file.yaml ARGS='key=value ...')"
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{ printf "  make %-9s %s\n", $$1, $$2 }'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,distributed]'
	touch $@

venv: $(VENV)/.installed viewer-assets  ## create .venv and install the package with dev extras

# The viewer's front-end libraries come from npm, pinned by package-lock.json, and are copied into the package
# (git-ignored; the wheel carries them). No third-party JavaScript is committed.
VENDOR := wsi_mil/viewer/static/vendor
OSD_BUILD := node_modules/openseadragon/build/openseadragon

viewer-assets: $(VENDOR)/openseadragon/openseadragon.min.js  ## OpenSeadragon from npm into the viewer

$(VENDOR)/openseadragon/openseadragon.min.js: package.json package-lock.json
	@if ! command -v npm >/dev/null; then \
	  echo "viewer assets: npm not found; install Node.js and npm (apt-get install -y npm), then run make viewer-assets"; \
	else \
	  npm ci --ignore-scripts --no-audit --no-fund --loglevel=error && rm -rf $(VENDOR)/openseadragon && \
	  mkdir -p $(VENDOR)/openseadragon && cp -r $(OSD_BUILD)/openseadragon.min.js $(OSD_BUILD)/images $(VENDOR)/openseadragon/ && \
	  cp node_modules/openseadragon/LICENSE.txt $(VENDOR)/openseadragon/ 2>/dev/null; touch $@; \
	fi

browser:  ## Debian's Chromium for the viewer's browser tests (installed when root with apt-get)
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "browser: apt-get install chromium failed; the browser tests will skip"; \
	  else echo "browser: no chromium and not root; the browser tests will skip (apt-get install -y chromium)"; fi; }

DICOM_DEBS := libturbojpeg0 orthanc orthanc-dicomweb
dicom-tools:  ## libturbojpeg (wsidicomizer) and Orthanc with DICOMweb for the DICOM tests (apt-get, when root)
	@{ ldconfig -p 2>/dev/null | grep -q libturbojpeg && command -v Orthanc >/dev/null && \
	   [ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; } || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DICOM_DEBS) >/dev/null) \
	      || echo "dicom-tools: apt-get install $(DICOM_DEBS) failed; the DICOM / DICOMweb tests will skip"; \
	  else echo "dicom-tools: not root; the DICOM / DICOMweb tests will skip (apt-get install -y $(DICOM_DEBS))"; fi; }

lint: venv  ## ruff, and the layering contracts in pyproject.toml (import-linter)
	$(VENV)/bin/ruff check wsi_mil pipelines tests
	$(VENV)/bin/lint-imports

# pytest-xdist workers: auto is one per core (tests/conftest.py gives each one torch thread); 0 runs in-process
TEST_WORKERS ?= auto
test: lint browser dicom-tools  ## lint, then the whole test suite (browser tests in Debian's Chromium)
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=15

TASK ?= classification
demo: venv  ## whole pipeline on generated synthetic slides (demo_out/; TASK=survival: demo_out_survival/)
	$(PY) pipelines/demo.py --task $(TASK) $(ARGS)

bench: venv  ## throughput figures (see docs/benchmarks.md)
	$(PY) -m pipelines.bench $(ARGS)

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

LABELS ?=
evaluate: venv  ## a trained run on another cohort, with 95% bootstrap intervals  (OUT=, LABELS=cohort.csv, ARGS=)
	$(WSI_MIL) evaluate --labels $(LABELS) $(STAGE_ARGS)

export: venv  ## features + patches in another tool's layout  (OUT=, FORMAT=clam|trident|torchmil, TO=)
	$(WSI_MIL) export --format $(FORMAT) --to $(TO) $(STAGE_ARGS)

view: venv  ## the study in the browser at http://127.0.0.1:8000/  (OUT=, ARGS='--slides DIR --port 8000')
	$(WSI_MIL) view --out $(OUT) $(ARGS)

config: venv  ## print the effective config as commented YAML  (CONFIG=, ARGS=)
	$(WSI_MIL) config $(if $(CONFIG),--config $(CONFIG)) $(ARGS)

clean:  ## remove outputs of demo and bench (keeps .venv)
	rm -rf demo_out demo_out_survival .bench out .pytest_cache build/screenshots
