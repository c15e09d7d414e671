# `make test`, `make demo` and `make gpu-check` work on a fresh machine: they create .venv and install requirements.txt.
# `make gpu-check PY=python3` (any interpreter that already has the requirements, e.g. a GPU image's or a
# cluster's environment) uses that Python as it is: no .venv, no install, no network.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The .venv is built only when the targets run its Python.
NEEDS_VENV := $(if $(filter $(VENV)/bin/python,$(PY)),$(STAMP))

.PHONY: test test-fast lint demo gpu-check venv clean

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

lint: $(NEEDS_VENV)
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -q tests

# The unit layer for the edit-run loop: no script subprocess, no ONNX export, no training run.
test-fast: lint
	$(PY) -m pytest -q -m "not slow and not cuda" tests

demo: $(NEEDS_VENV)
	$(PY) demo.py

# Every CUDA path (pytest -m cuda, GPU benchmark rows) in under 8 minutes; without a GPU it says so and exits 0.
gpu-check: $(NEEDS_VENV)
	$(PY) gpu_check.py

clean:
	rm -rf $(VENV) .pytest_cache
