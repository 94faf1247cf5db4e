# Two commands matter on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# torch is installed explicitly first: a bare `torch` requirement would pull multi-GB CUDA wheels.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.lethe-installed

.PHONY: install demo test lint typecheck bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e '.[dev,lm,demo,bench]'
	touch $(STAMP)

demo: install
	$(VENV)/bin/lethe demo

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports  # the layer contracts in pyproject.toml [tool.importlinter]

typecheck: install  # [tool.mypy] in pyproject.toml names the packages
	$(VENV)/bin/mypy

bench: install
	$(PY) -m bench.run_all

clean:
	rm -rf .lethe .pytest_cache
