# `make demo` and `make test` set everything up on a fresh machine, then run.
# They install the versions pinned in constraints.txt; `make lock` updates the pins, on purpose.
PYTHON ?= python3
VENV   ?= .venv
# torch is pinned here, not in constraints.txt: this machine's pip takes a local CPU wheel
# of 2.13.0. Elsewhere choose the build you want, e.g. `make test TORCH='torch>=2.4'`.
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.zoo-installed
PIP    := -m pip install --quiet -c constraints.txt
# pip builds zoo itself in an isolated environment; the variable pins setuptools there too.
PINNED := PIP_CONSTRAINT=$(CURDIR)/constraints.txt
LOCK_VENV := .venv-lock

.PHONY: demo demo-llm test setup postgres browser bench docs lock clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python $(PIP) --upgrade pip
	$(BIN)/python $(PIP) "$(TORCH)"
	$(PINNED) $(BIN)/python $(PIP) -e ".[s3,test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/zoo demo

# The LLM demo: a tiny Llama base, one causal-LM expert per text task, merged and measured by
# greedy exact match (docs/demo.md).
demo-llm: $(STAMP)
	$(BIN)/zoo demo --llm

# The registry tests run on SQLite and on a real PostgreSQL server that the tests start on a
# private port and socket in a temp folder and stop at the end (tests/postgres.py). This
# installs Debian's postgresql package first where it is missing (as root); without it
# those tests skip with the reason.
postgres:
	$(BIN)/python tests/postgres.py

# The object-store tests start moto's S3-compatible server (moto[server], in the test extra) on a
# private loopback port and stop it at the end (tests/s3.py).
test: $(STAMP) postgres browser
	$(BIN)/python -m pytest -q

# tests/test_web.py drives the distribution's chromium through Playwright (no browser download).
# Installed when missing, as root on Debian; elsewhere install chromium yourself (the test skips, saying so).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } || \
	  echo "no chromium: tests/test_web.py will skip (install Debian's chromium package)"

# The CLI reference, from every command's --help (tests/test_cli_help.py checks it is current).
docs: $(STAMP)
	$(BIN)/python -m zoo.cli.reference docs/cli.md

# Resolve the newest versions pyproject.toml allows in a scratch venv and pin them all
# (but zoo itself, and torch, which TORCH pins). Review the diff, run `make test`, commit.
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install --quiet "$(TORCH)"
	$(LOCK_VENV)/bin/python -m pip install --quiet -e ".[s3,test]"
	{ sed -n '/^#/p' constraints.txt; \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable | grep -viE '^(zoo|torch|triton|nvidia-[^=]*)=='; \
	} > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf $(LOCK_VENV)

# merge_vs_mergekit.py and hub_transfer.py need the 1B family (and a mergekit venv): see docs/results.md.
bench: $(STAMP)
	$(BIN)/python bench/add_throughput.py
	$(BIN)/python bench/list_10k.py
	$(BIN)/python bench/list_pg.py
	$(BIN)/python bench/store_s3.py
	$(BIN)/python bench/cli_startup.py
	$(BIN)/python bench/demo_interference.py
	$(BIN)/python bench/learned_demo.py --investigate
	$(BIN)/python bench/parity_demo.py
	$(BIN)/python bench/protect_demo.py
	$(BIN)/python bench/extract_lora.py

clean:
	rm -rf $(VENV) $(LOCK_VENV) registry.db registry.db-* registry.store
