# The README's two commands: `make demo` (the main job) and `make test` (the test suite).
# Each creates .venv on first use: torch==2.13.0 first (a CPU build; an unpinned
# torch would pull a multi-GB CUDA build), then tapml in editable mode.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= out

.PHONY: demo test setup lint bench clean

$(BIN)/.tapml-ready: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[zoo,dev]'
	touch $@

setup: $(BIN)/.tapml-ready

demo: setup
	$(BIN)/tapml carve zoo:minilm -o $(OUT)/minilm-store --force --verify-replay

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python benchmarks/carve.py

clean:
	rm -rf $(OUT) .pytest_cache
