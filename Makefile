# `make demo` and `make test` set everything up on a fresh machine, then run.
PYTHON ?= python3
VENV   ?= .venv
# The CPU build of torch; on a CUDA machine override, e.g. `make test TORCH='torch>=2.4'`.
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.zoo-installed

.PHONY: demo test setup bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/zoo demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# merge_vs_mergekit.py and hub_transfer.py need the 1B family (and a mergekit venv): see bench/RESULTS.md.
bench: $(STAMP)
	$(BIN)/python bench/add_throughput.py
	$(BIN)/python bench/list_10k.py
	$(BIN)/python bench/demo_interference.py
	$(BIN)/python bench/learned_demo.py --investigate
	$(BIN)/python bench/parity_demo.py
	$(BIN)/python bench/protect_demo.py

clean:
	rm -rf $(VENV) registry.db registry.db-* registry.store
