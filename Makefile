# iopnet: `make run` and `make test` set themselves up from nothing (.venv + install).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup run test lint format bench schemas clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "iopnet needs python3 >= 3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/iopnet run $(if $(DEMO),--demo,)

test: setup
	$(BIN)/pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: setup
	$(BIN)/iopnet bench $(BENCH_ARGS)

schemas: setup
	$(BIN)/python -m shared.contracts.schemas
	$(BIN)/python -m iopnet.asyncapi_docs

clean:
	rm -rf $(VENV) .data .cache .pytest_cache .ruff_cache *.egg-info
