# `make test`, `make demo` and `make gpu-check` work on a fresh machine: they create .venv and install requirements.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test lint demo gpu-check venv clean

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) demo.py

# Every CUDA path (pytest -m cuda, GPU benchmark rows) in under 8 minutes; without a GPU it says so and exits 0.
gpu-check: $(STAMP)
	$(PY) gpu_check.py

clean:
	rm -rf $(VENV) .pytest_cache
