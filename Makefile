# Reproduction of "Stochastic Hyperparameter Optimization through Hypernetworks" (Lorraine & Duvenaud, 2018).
#   make reproduce   every figure at default settings, the numbers, and paper/main.pdf
#   make test        the test suite
#   make quick       the same pipeline with --quick everywhere, into build/quick/ (paper/ is never touched)
#   make paper       paper/results.tex from paper/results/*.json, then paper/main.pdf
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# Every experiment script; each writes paper/<figure>.pdf|png and paper/results/<script>.json|npz.
EXPERIMENTS := loss_manifold hypernets_global_small hypernets_local_small learn_vs_true_loss_scatter \
               hypernets_local_large compare_number_layers hypernets_local_medium
QUICK_DIR   := $(CURDIR)/build/quick
LATEXMK     := latexmk -pdf -interaction=nonstopmode -halt-on-error
# $(call run_experiments,FLAGS): every script with FLAGS; the scatter script also writes the GP-vs-hypernet table.
run_experiments = set -e; for s in $(EXPERIMENTS); do \
	  extra=; if [ $$s = learn_vs_true_loss_scatter ]; then extra=--table; fi; \
	  echo "== $$s.py $$extra $(1)"; $(PY) code/$$s.py $$extra $(1); done

.PHONY: venv test lint data figures results-tex paper reproduce quick benchmark

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

benchmark: venv
	cd code && OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 ../$(PY) benchmark.py

figures: venv data
	@$(call run_experiments,)

results-tex: venv
	$(PY) code/make_results_tex.py

paper: results-tex
	cd paper && $(LATEXMK) main.tex

reproduce: venv data figures paper

quick: venv data
	@$(call run_experiments,--quick --out-dir $(QUICK_DIR))
	cp paper/main.tex paper/main_bib.bib $(QUICK_DIR)/
	$(PY) code/make_results_tex.py --results-dir $(QUICK_DIR)/results --out $(QUICK_DIR)/results.tex
	cd $(QUICK_DIR) && $(LATEXMK) main.tex
	@echo "quick paper: $(QUICK_DIR)/main.pdf"
