# Two entry points: `make demo` (the whole pipeline on CPU) and `make test`.
# Both build .venv on their own; the CPU torch wheel is installed first so pip
# never pulls a multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench gpu-check clean venv

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
	$(BIN)/python bench/sample.py
	$(BIN)/python bench/data.py
	$(BIN)/python bench/sft.py
	$(BIN)/python bench/id_scan.py

# On a CUDA machine: tests/gpu, runpod_1b and runpod_2b for 30 steps, one save and resume (< 8 min on
# one H100/H200). It needs a CUDA build of torch, which .venv (CPU torch) does not have: run it with
# the GPU machine's Python, where `pip install -e '.[dev,cuda]'` installed the project.
GPU_PY ?= python3
gpu-check:
	$(GPU_PY) bench/gpu_check.py

clean:
	rm -rf $(VENV) workspace
