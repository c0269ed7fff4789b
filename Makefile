# roads: `make run` runs the default study on CPU; `make test` runs the test suite. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIPELINE ?= default

.PHONY: run test smoke bench ui clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -m pip install --quiet torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -m pip install --quiet -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import roads, tasks, flows, prefect, mlflow, trl" && touch $(STAMP)

run: $(STAMP)
	$(BIN)/roads run $(PIPELINE)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

smoke: $(STAMP)
	$(BIN)/roads run smoke

bench: $(STAMP)
	$(BIN)/python bench/overhead.py

ui: $(STAMP)
	$(BIN)/roads ui

clean:
	rm -rf .roads
