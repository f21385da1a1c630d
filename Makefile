# Reproduction of "Stochastic Hyperparameter Optimization through Hypernetworks" (Lorraine & Duvenaud, 2018).
#   make reproduce   every figure at default settings, the numbers, paper/main.pdf, and the scorecard
#   make quick       the same pipeline with --quick everywhere, into build/quick/ (paper/ is never touched)
#   make test        the test suite (what CI runs)
#   make seeds       the cheap experiments again for the seeds of code/experiments.py (scorecard mean +- sd)
#   make paper       paper/results.tex and the scorecard from paper/results/*.json, then paper/main.pdf
#   make study       the hypergradient study (about 7 CPU minutes; its results are committed)
#   make ground-truth  rebuild the cached ground truth of Figure 6 (the one step make reproduce reuses)
#   make benchmark   hot-loop speed-ups against their autograd references, and fractions of the machine's bound
PYTHON ?= python3
VENV   := .venv
PY     := $(CURDIR)/$(VENV)/bin/python
STAMP  := $(VENV)/.installed

# The scripts, listed once in code/experiments.py; each writes paper/<figure>.pdf|png and paper/results/<script>.*
EXPERIMENTS = $(shell $(PYTHON) code/experiments.py --reproduce)
STUDIES     = $(shell $(PYTHON) code/experiments.py --studies)
SEEDED      = $(shell $(PYTHON) code/experiments.py --seeded)
SEEDS       = $(shell $(PYTHON) code/experiments.py --seeds)
QUICK_DIR   := $(CURDIR)/build/quick
SEEDS_DIR   := $(CURDIR)/paper/results/seeds
LATEXMK     := latexmk -pdf -interaction=nonstopmode -halt-on-error
# TeX packages main.tex loads, checked before any experiment runs (Debian: see TEX_DEBS).
TEX_FILES   := mathptmx.sty geometry.sty amsmath.sty booktabs.sty tabularx.sty algorithm.sty algpseudocode.sty \
               natbib.sty xcolor.sty placeins.sty hyperref.sty longtable.sty
TEX_DEBS    := texlive-latex-base texlive-latex-recommended texlive-latex-extra texlive-science \
               texlive-fonts-recommended latexmk
# $(call run_experiments,FLAGS,SCRIPTS): each script at its defaults, plus FLAGS.
run_experiments = set -e; for s in $(2); do echo "== $$s.py $(1)"; $(PY) code/$$s.py $(1); done
# $(call latex,DIR): compile DIR/main.tex; latexmk's output goes to DIR/latexmk.log, errors are shown.
latex = cd $(1) && if $(LATEXMK) main.tex > latexmk.log 2>&1; then echo "wrote $(1)/main.pdf (log: $(1)/latexmk.log)"; \
	else grep -A4 '^!' main.log 2>/dev/null || tail -20 latexmk.log; echo "error: LaTeX failed; see $(1)/latexmk.log"; exit 1; fi

.PHONY: venv test lint data check-tex figures results-tex paper reproduce quick seeds study ground-truth benchmark

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
	cd code && $(PY) data_loader.py

check-tex:
	@command -v latexmk >/dev/null 2>&1 || { echo "error: latexmk is missing; install it with: sudo apt-get install $(TEX_DEBS)"; exit 1; }
	@missing=; for f in $(TEX_FILES); do kpsewhich $$f >/dev/null || missing="$$missing $$f"; done; \
	  if [ -n "$$missing" ]; then echo "error: TeX files missing:$$missing; install: sudo apt-get install $(TEX_DEBS)"; exit 1; fi

benchmark: venv
	cd code && $(PY) benchmark.py

figures: venv data
	@$(call run_experiments,,$(EXPERIMENTS))

results-tex: venv
	@if [ -d $(SEEDS_DIR) ]; then $(PY) code/make_results_tex.py --seeds-dir $(SEEDS_DIR); \
	 else $(PY) code/make_results_tex.py; fi

paper: check-tex results-tex
	@$(call latex,$(CURDIR)/paper)

reproduce: check-tex venv data figures paper

seeds: venv data
	@set -e; for seed in $(SEEDS); do for s in $(SEEDED); do \
	  extra=$$($(PYTHON) code/experiments.py --seed-flags $$s); \
	  echo "== $$s.py --seed $$seed $$extra"; \
	  $(PY) code/$$s.py $$extra --seed $$seed --out-dir $(CURDIR)/build/seeds/seed-$$seed; \
	  mkdir -p $(SEEDS_DIR)/seed-$$seed/results; \
	  cp build/seeds/seed-$$seed/results/$$s.json $(SEEDS_DIR)/seed-$$seed/results/; done; done
	$(PY) code/make_results_tex.py --seeds-dir $(SEEDS_DIR)

# Studies too long for make reproduce (results committed; the paper reads them): the hypergradient study.
study: venv data
	@$(call run_experiments,,$(STUDIES))

# The 10,240-model ground truth of Figure 6 (about 16 CPU minutes), rebuilt and cached in cache/ (committed, so
# make reproduce reuses it); then the scatter experiment on it.
ground-truth: venv data
	rm -f cache/learn_vs_true_loss_ground_truth_*.npz
	$(PY) code/learn_vs_true_loss_scatter.py --jobs 2

quick: check-tex venv data
	@$(call run_experiments,--quick --out-dir $(QUICK_DIR),$(EXPERIMENTS) $(STUDIES))
	cp paper/main.tex paper/main_bib.bib $(QUICK_DIR)/
	$(PY) code/make_results_tex.py --results-dir $(QUICK_DIR)/results --out $(QUICK_DIR)/results.tex
	@$(call latex,$(QUICK_DIR))
