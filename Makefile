# Two commands a newcomer needs: `make demo` and `make test`. Both set up what is missing.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PYTHON  ?= python3

.PHONY: demo test check lint format typecheck unit services bench soak clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

services:
	@bash .ci/services

demo: $(STAMP) services
	$(VENV)/bin/outbox-relay demo

test: $(STAMP) services check
	$(PY) -m pytest

check: lint typecheck

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

unit: $(STAMP)
	$(PY) -m pytest tests/unit

bench: $(STAMP) services
	$(PY) -m bench

soak: $(STAMP) services
	OUTBOX_SOAK=1 $(PY) -m pytest tests/faults -m soak --timeout=1800

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache
