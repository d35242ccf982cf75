# Two commands do all of the set-up: `make demo` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: demo test test-fast lint bench bench-full bench-gpu bench-archs study realism mutants clean-cache help

help:
	@echo "make demo   - set up .venv, then run the notebook (simulated data unless DEEPLENSE_DATA is set)"
	@echo "make test   - set up .venv, then ruff and pytest"
	@echo "make test-fast - ruff and the tests not marked slow (under a minute on 2 cores): the edit loop"
	@echo "make bench  - quick benchmarks (see benchmarks/README.md)"
	@echo "make bench-gpu - the GPU benchmarks (about 4 minutes on one H100; prints a skip line without CUDA)"
	@echo "make bench-archs - parameters and CPU speed of every --arch; fills docs/networks.md's arch table (minutes)"
	@echo "make study  - the accuracy study (about 80 min for 5 arms on 2 CPU cores); fills docs/studies.md's study table"
	@echo "make realism REAL=DIR - every preset against real images in DIR (statistics, two-sample test); docs/simulation.md table"
	@echo "make mutants - plant known faults one at a time and check the tests catch each (minutes; not in CI)"

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m deeplense demo

lint: $(STAMP)
	$(BIN)/ruff check Common_Task tests benchmarks experiments

test: lint
	$(BIN)/python -m pytest -q

test-fast: lint
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

bench-full: $(STAMP)
	$(BIN)/python benchmarks/run_all.py --full

bench-gpu: $(STAMP)
	$(BIN)/python benchmarks/bench_gpu.py

bench-archs: $(STAMP)
	$(BIN)/python benchmarks/bench_archs.py --readme

study: $(STAMP)
	$(BIN)/python experiments/accuracy_study.py --readme

REALISM_PRESETS := realistic benchmark common_task model_i benchmark_v1

realism: $(STAMP)
	@test -n "$(REAL)" || { echo "usage: make realism REAL=path/to/real/images (a folder with no/ sphere/ vort/ below it)"; exit 2; }
	for p in $(REALISM_PRESETS); do \
	  $(BIN)/python -m deeplense realism --real $(REAL) --preset $$p --n 100 --seed 0 \
	    --out experiments/results/realism/$$p || exit $$?; done
	$(BIN)/python experiments/realism_table.py --readme

mutants: $(STAMP)
	$(BIN)/python tests/mutants.py
