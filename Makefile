# Two entry points: `make demo` (the whole pipeline on CPU) and `make test`.
# Both build .venv on their own; the CPU torch wheel is installed first so pip
# never pulls a multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench gpu-wheels gpu-check clean venv

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

# On a CUDA machine, offline: tests/gpu, runpod_1b and runpod_2b under none/DDP/FSDP2, packed attention,
# one save and resume (< 8 min on one H100/H200), every figure in $OUT/gpu_check.json. It needs a CUDA
# build of torch, which .venv (CPU torch) does not have: it runs with the GPU machine's python3 and
# installs the wheels `make gpu-wheels` fetched (.gpu-wheels/) where a registry was reachable.
GPU_PY ?= python3
gpu-wheels:
	bash bench/gpu_wheels.sh

gpu-check:
	PYTHON=$(GPU_PY) bash bench/gpu_check.sh

clean:
	rm -rf $(VENV) workspace
