# Two entry points (see README): `make demo` and `make test`. Both build .venv first.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch pulls the multi-GB CUDA wheels
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -e ".[test,serve,quantize,bench,ray,search,arrow]"
	touch $(STAMP)

.PHONY: install demo demo-serve test bench mutants
install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/arrowvision demo

# The search page over the sample photos (prints its URL; Ctrl-C stops). PORT=0 picks a free port.
PORT ?= 8000
demo-serve: $(STAMP)
	$(VENV)/bin/arrowvision demo --serve --port $(PORT)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/load_time.py
	$(VENV)/bin/python benchmarks/parity.py

# Mutation check (not in CI; see docs/TESTING.md): mutmut plants small bugs in model, preprocess,
# config and format and runs the fast tests against each. Narrow it with e.g.
# `make mutants MUTANTS='arrowvision.model.vision*'`; `.venv/bin/mutmut browse` shows the survivors.
MUTANTS ?=
mutants: $(STAMP)
	$(VENV)/bin/pip install --quiet -e ".[mutation]"
	OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children 2 $(MUTANTS)
	$(VENV)/bin/mutmut results
