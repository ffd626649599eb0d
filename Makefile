# Self-bootstrapping targets: each creates .venv when missing.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH_CPU_WHEEL ?= torch==2.13.0

.PHONY: demo demo-quick test test-all lint format bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# The CPU wheel first: an unpinned torch would pull a multi-GB CUDA build.
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_CPU_WHEEL)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ppomax demo $(ARGS)

demo-quick: $(STAMP)
	$(BIN)/ppomax demo --quick $(ARGS)

# CI runs this: lint, format and type checks first (seconds; mypy's first run about a minute), then the default
# suite.
test: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

bench: $(STAMP)
	$(BIN)/python bench/ppo_iteration.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
