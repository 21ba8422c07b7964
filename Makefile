# iopnet: `make run` and `make test` set themselves up from nothing (.venv + install).
# Dependencies come from the hash-checked locks in requirements/ (pip-tools, from
# pyproject.toml); the project itself is installed on top with --no-deps. `make lock`
# re-resolves them after a change to pyproject.toml (tests/deploy/test_lock.py fails
# until then); `make lock-upgrade` moves every pin to the newest release.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
LOCKS  := requirements/build.txt requirements/runtime.txt requirements/dev.txt
# CUSTOM_COMPILE_COMMAND: the locks' header names `make lock`, not a pip-compile line.
PIP_COMPILE = CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile --quiet --generate-hashes --allow-unsafe \
	--strip-extras --no-emit-index-url --no-emit-find-links $(LOCK_ARGS)

.PHONY: setup run test lint format bench schemas clean lock lock-upgrade lock-check

$(STAMP): pyproject.toml $(LOCKS)
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "iopnet needs python3 >= 3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --require-hashes --no-deps -r requirements/dev.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
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
	$(BIN)/hadolint deploy/Dockerfile

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: setup
	$(BIN)/iopnet bench $(BENCH_ARGS)

schemas: setup
	$(BIN)/python -m shared.contracts.schemas
	$(BIN)/python -m iopnet.asyncapi_docs
	$(BIN)/python -m iopnet.natsd
	$(BIN)/python -m iopnet.events_doc

# dev.txt is resolved first (runtime + dev extras); runtime.txt and build.txt take the
# same versions from it (-c), so the image runs exactly what the tests ran. Existing pins
# are kept unless pyproject.toml no longer allows them.
lock: setup
	$(PIP_COMPILE) --extra dev -o requirements/dev.txt pyproject.toml
	$(PIP_COMPILE) -c requirements/dev.txt -o requirements/runtime.txt pyproject.toml
	$(PIP_COMPILE) --all-build-deps --only-build-deps -c requirements/dev.txt -o requirements/build.txt pyproject.toml

lock-upgrade:
	$(MAKE) lock LOCK_ARGS=--upgrade

# Needs the package index: fails if `make lock` would change a file.
lock-check: lock
	git diff --exit-code -- $(LOCKS)

clean:
	rm -rf $(VENV) .data .cache .pytest_cache .ruff_cache *.egg-info
