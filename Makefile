# TCP Dashboard: `make demo` and `make test` work on a fresh clone with Python 3.11/3.12 and make.
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# bytewax 0.21.1 ships wheels for CPython 3.11 and 3.12 only: find one of those.
PYTHON ?= $(shell for p in python3.12 python3.11 python3 python; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(0 if (3,11) <= sys.version_info[:2] <= (3,12) else 1)' 2>/dev/null && { echo $$p; break; }; \
	done)

.PHONY: install demo test bench lint services-down clean

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

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) bench/run.py

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

services-down: install
	$(VENV)/bin/tcp services down

clean:
	-$(VENV)/bin/tcp services down
	rm -rf $(VENV) .tcp .pytest_cache .mypy_cache .ruff_cache
