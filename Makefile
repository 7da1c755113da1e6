# Two entry points (see README): `make run` sets up and runs the main job, `make test` sets up and runs the tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is pinned to the CPU build that installs from this machine's disk.
TORCH  := torch==2.13.0

.PHONY: setup run test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

run: setup
	$(PY) examples/quickstart.py

test: setup
	$(PY) -m pytest

clean:
	rm -rf $(VENV) build src/*.egg-info
