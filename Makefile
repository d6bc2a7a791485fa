# Two entry points for a fresh machine: `make demo` (the main job) and `make test` (the suite).
# Each bootstraps its own virtual environment.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXTRAS ?= dev,train,device,source,sim

.PHONY: demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

# tritonclient[grpc] pins protobuf < 7 and rocoin needs >= 7.35: the client gets an environment of
# its own (inside $(VENV), so `make clean` removes it) for tests/integration/test_tritonclient_grpc.py.
TRITONCLIENT_GRPC := $(VENV)/tritonclient-grpc
$(TRITONCLIENT_GRPC)/.installed: | $(STAMP)
	$(PYTHON) -m venv $(TRITONCLIENT_GRPC)
	$(TRITONCLIENT_GRPC)/bin/pip install --quiet "tritonclient[grpc]>=2.40"
	touch $@

demo: $(STAMP)
	$(BIN)/rocoin demo --output results/demo

test: $(STAMP) $(TRITONCLIENT_GRPC)/.installed
	$(BIN)/python -m pytest -q

# The fast loop: unit and integration tests, no demo, experiments or fuzzing (tests/e2e).
test-fast: $(STAMP) $(TRITONCLIENT_GRPC)/.installed
	$(BIN)/python -m pytest -q -m "not e2e"

lint: $(STAMP)
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts

bench: $(STAMP)
	$(BIN)/python bench/planner.py

clean:
	rm -rf $(VENV) results .pytest_cache .hypothesis
