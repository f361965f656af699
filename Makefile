# Two commands on a fresh machine:  `make demo`  and  `make test`.
# TORCH_SPEC picks the torch build; on a GPU machine e.g.
#   make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN        := $(VENV)/bin
STAMP      := $(VENV)/.mtag-installed
DEMO_DIR   ?= demo

.PHONY: setup demo test test-fast lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and alone: the pinned CPU build; the ranges below are satisfied by it
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	# renders the demo catalogue; its pyaudio dependency is only for live playback
	$(BIN)/python -m pip install -q --no-deps -c constraints.txt tinysoundfont
	touch $(STAMP)

demo: setup
	$(BIN)/mtag demo --dir $(DEMO_DIR)

# the whole suite, then ruff and mypy (CI runs this through .ci/run)
test: setup
	$(BIN)/python -m pytest -q --durations=20
	$(BIN)/ruff check flows tasks featurestore training infra tests bench
	$(BIN)/mypy

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check flows tasks featurestore training infra tests bench
	$(BIN)/mypy

bench: setup
	$(BIN)/python bench/ingest_bench.py --help

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .mypy_cache .ruff_cache
