# Reproduction of "Stochastic Hyperparameter Optimization through Hypernetworks" (Lorraine & Duvenaud, 2018).
#   make reproduce   every figure at default settings, the numbers, and paper/main.pdf
#   make test        the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv test lint data

venv: $(STAMP)
$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

test: venv
	$(PY) -m pytest -q

lint: venv
	$(PY) -m ruff check code tests

data: venv
	cd code && ../$(PY) data_loader.py
