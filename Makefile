# Two entry points: `make demo` (the whole pipeline on CPU) and `make test`.
# Both build .venv on their own; the CPU torch wheel is installed first so pip
# never pulls a multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean venv

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m orchestrator.demo

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/trainer.py
	$(BIN)/python bench/sharder.py
	$(BIN)/python bench/tokenize.py
	$(BIN)/python bench/memory_plan.py

clean:
	rm -rf $(VENV) workspace
