# edgefleet: the two commands a newcomer needs are `make demo` and `make test`.
# Both create .venv when it is absent and install what they need into it.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-all
# Command-line tools the test suite drives for real (broker, bundle verification by hand).
TOOLS  := mosquitto openssl zstd tar sha256sum base64
DEBPKG := mosquitto openssl zstd tar coreutils
PYDIRS := edgefleet agent server compression firmware_sim tests benchmarks examples

.PHONY: help setup tools services test demo lint format bench reliability clean

help:
	@echo "make demo         set up and run the end-to-end demo"
	@echo "make test         set up and run the whole test suite"
	@echo "make lint         ruff + mypy + import-linter layering contracts"
	@echo "make bench        run every benchmark (prints ratios against in-run baselines)"
	@echo "make reliability  long fault campaigns (hundreds of power cuts)"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[all]'
	@touch $(STAMP)

setup: $(STAMP)

# Tools the tests start or call. Installed from Debian's packages when running as
# root (CI, fresh machines); otherwise we stop and say what to install.
tools:
	@missing=""; for t in $(TOOLS); do \
	  command -v $$t >/dev/null 2>&1 || test -x /usr/sbin/$$t || missing="$$missing $$t"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEBPKG) >/dev/null; \
	  else \
	    echo "make test needs:$$missing (Debian/Ubuntu: sudo apt-get install $(DEBPKG))" >&2; exit 1; \
	  fi; \
	fi

# PostgreSQL at 127.0.0.1:5432 (database `test`, user postgres, trust auth) for the
# server tests; override with EDGEFLEET_TEST_PG_URL. Started here if it is installed
# but down (this project's CI machines start it before the run).
services:
	@if command -v pg_isready >/dev/null 2>&1 && ! pg_isready -q -h 127.0.0.1 -p 5432; then \
	  if command -v pg_ctlcluster >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql | head -n1) main start || true; \
	  fi; \
	fi

test: setup tools services
	$(BIN)/python -m pytest

demo: setup tools
	bash examples/demo.sh

lint: setup
	$(BIN)/ruff check $(PYDIRS)
	$(BIN)/ruff format --check $(PYDIRS)
	$(BIN)/mypy edgefleet agent server compression firmware_sim
	$(BIN)/lint-imports

format: setup
	$(BIN)/ruff check --fix $(PYDIRS)
	$(BIN)/ruff format $(PYDIRS)

bench: setup tools
	@for b in benchmarks/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

reliability: setup tools
	$(BIN)/python benchmarks/reliability.py --runs 300

clean:
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache .ruff_cache .hypothesis .import_linter_cache
