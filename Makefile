# Two commands from a fresh clone (each sets up .venv on first use, then reuses it):
#   make demo   the whole pipeline on the built-in simulated demo, then its HTML report
#   make test   lint (snakefmt, snakemake --lint, ruff), then the test suite (adds the [state] extra)
# Options: CORES=8 make demo; TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
# for a CUDA build; VENV=/path/to/venv to use another environment.
PYTHON ?= python3
VENV ?= .venv
CORES ?= 2
TORCH ?= torch==2.13.0
SCGPT ?= scgpt==0.2.4
REPORT ?= results/report.html

BIN := $(VENV)/bin
READY := $(VENV)/.ccfm-installed
STATE_READY := $(VENV)/.ccfm-state-installed

.PHONY: demo test lint env

demo: $(READY)
	$(BIN)/snakemake --cores $(CORES) demo
	@$(MAKE) --no-print-directory $(REPORT)
	@$(BIN)/python -m ccfm.evaluate.headline results/demo/metrics_summary.tsv --report $(REPORT)

# The runtime table is the demo's last job: the report is rebuilt only after a run changed something.
$(REPORT): results/demo/runtime.tsv
	$(BIN)/snakemake --report $@ demo

# written by the snakemake run above (no make recipe of its own)
results/demo/runtime.tsv: ;

test: $(STATE_READY) lint
	$(BIN)/pytest

# Formatting and lint of the Snakemake files and the Python code (configured in pyproject.toml).
lint: $(READY)
	$(BIN)/snakefmt --check Snakefile workflow
	$(BIN)/snakemake --lint
	$(BIN)/ruff check

env: $(READY)

# The order matters: torch first (a plain dependency resolve would pull a multi-GB CUDA build),
# then the package with its extras, then scGPT without its ancient pinned dependencies.
# Reinstalls only when pyproject.toml or this Makefile changes.
$(READY): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps $(SCGPT)
	touch $@

# The tests also cover Arc's State (the [state] extra: arc-state, lightning, transformers; ~350 MB).
$(STATE_READY): $(READY)
	$(BIN)/python -m pip install --quiet -e ".[dev,state]"
	touch $@
