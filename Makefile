# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: venv test test-all demo bench clean

venv: $(VENV)/.installed

# Where there is no GPU, take the CPU build of torch first (a local wheel on the
# project machines); otherwise requirements.txt lets pip pick a CUDA build.
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0 || true; fi
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# One OpenMP thread per process unless told otherwise: the tests start train/evaluate/torchrun
# subprocesses, and several multi-threaded processes on a small machine wait on each other.
test: venv
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q -m "not slow"

test-all: venv
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q

demo: venv
	bash scripts/demo.sh $(PY)

bench: venv
	$(PY) bench.py

clean:
	rm -rf demo_runs .pytest_cache
