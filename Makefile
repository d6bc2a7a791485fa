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

demo: $(STAMP)
	$(BIN)/rocoin demo --output results/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The fast loop: unit and integration tests, no demo, experiments or fuzzing (tests/e2e).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not e2e"

lint: $(STAMP)
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts

bench: $(STAMP)
	$(BIN)/python bench/planner.py

clean:
	rm -rf $(VENV) results .pytest_cache .hypothesis
