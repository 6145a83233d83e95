# Three commands on a fresh machine (Python 3.11 + the package registry):
#   make demo   trains a tiny model on the built-in synthetic shapes and writes videos to demo_out/
#   make distill  (after make demo) distills the demo model into a 4-step student
#   make test   lints and runs the test suite on 8 fake CPU devices (what CI runs)
# Each creates .venv if missing and installs what it needs.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip -q --disable-pip-version-check
QUICK  ?=

.PHONY: demo distill test install install-test lint clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -e .
	touch $@

# torch first, pinned: its CPU wheel; diffusers/transformers must not pull another build.
$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[test,dev]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

lint: install-test
	$(VENV)/bin/ruff check vdit tests bench configs

# Test files run in TEST_WORKERS processes (pytest-xdist; a file's tests stay in one process, so
# its module fixtures are built once), heaviest files first (tests/conftest.py); the JAX
# compilation cache is shared between them. The 30 slowest tests are listed at the end (where the
# suite's time goes, run after run).
TEST_WORKERS ?= 2

test: install-test lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=30 tests

demo: install
	$(PY) -m vdit.demo --out demo_out $(if $(QUICK),--quick,)

clean:
	rm -rf demo_out .pytest_cache .ruff_cache

# After `make demo`: distills demo_out/runs/dit into a 4-step student (demo_out/runs/distill),
# samples the same held-out prompts into demo_out/distill_samples/ and judges teacher vs student.
distill: install
	$(PY) -m vdit.demo_distill --out demo_out $(if $(QUICK),--quick,)
