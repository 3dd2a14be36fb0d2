# TCP Dashboard: `make demo` and `make test` work on a fresh clone with Python 3.11/3.12 and make.
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# bytewax 0.21.1 ships wheels for CPython 3.11 and 3.12 only: find one of those.
PYTHON ?= $(shell for p in python3.12 python3.11 python3 python; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(0 if (3,11) <= sys.version_info[:2] <= (3,12) else 1)' 2>/dev/null && { echo $$p; break; }; \
	done)

.PHONY: install browser demo test bench drill lint services-down clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@if [ -z "$(PYTHON)" ]; then \
		echo "error: TCP Dashboard needs CPython 3.11 or 3.12 (bytewax 0.21.1 has wheels for those only)."; \
		echo "       Found: $$(python3 --version 2>&1 || echo 'no python3'). Install python3.12 or python3.11, or run: make PYTHON=/path/to/python3.12"; \
		exit 1; fi
	@$(PYTHON) -c 'import sys; v=sys.version_info[:2]; sys.exit(0 if (3,11)<=v<=(3,12) else "error: $(PYTHON) is Python %d.%d; TCP Dashboard needs 3.11 or 3.12 (bytewax wheels)" % v)'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)
	@echo "installed into $(VENV) ($$($(PY) --version))"

demo: install
	$(VENV)/bin/tcp demo

test: install browser
	$(PY) -m pytest -q

# The real-browser tests (tests/test_dashboard_browser.py) drive Debian's chromium through its
# chromium-driver. Installed here when missing and possible (root with apt-get); otherwise those
# tests are skipped, and pytest says why.
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing chromium and chromium-driver (Debian) for the real-browser tests ..."; \
			export DEBIAN_FRONTEND=noninteractive; \
			apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
			{ apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } || \
			echo "WARNING: chromium could not be installed: the real-browser tests will be SKIPPED"; \
		else \
			echo "WARNING: no /usr/bin/chromium and no root apt-get to install it: the real-browser tests will be SKIPPED"; \
		fi; \
	fi

bench: install
	$(PY) bench/run.py

# Fault drills: the tests marked `drill` at full size (tests/drill_util.py); their figures go to
# the "Fault drills" section of BENCHMARKS.md (bench/drills.py), passed or not.
drill: install
	@rm -f .drills.jsonl; started=$$(date +%s); \
	TCP_DRILL=1 TCP_DRILL_REPORT=$(CURDIR)/.drills.jsonl $(PY) -m pytest -q -m drill -o timeout=3600; rc=$$?; \
	$(PY) bench/drills.py .drills.jsonl --started $$started $$([ $$rc = 0 ] && echo --passed); exit $$rc

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

services-down: install
	$(VENV)/bin/tcp services down

clean:
	-$(VENV)/bin/tcp services down
	rm -rf $(VENV) .tcp .pytest_cache .mypy_cache .ruff_cache
