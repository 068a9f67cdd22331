# Two commands a newcomer needs: `make demo` and `make test`. Both set up what is missing.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench
PYTHON  ?= python3

.PHONY: demo test check lint format typecheck unit services bench soak clean package-check

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The benchmark-only extra (txoutbox, the relay `make bench` compares ours with); `make test`
# does not need it.
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

services:
	@bash .ci/services

demo: $(STAMP) services
	$(VENV)/bin/outbox-relay demo

test: $(STAMP) services check package-check
	bash .ci/pytest-in-two $(PY)

# The package as users install it: the wheel, in fresh virtualenvs, with only its declared
# extras (never the dev ones), run from outside the source tree so that the source cannot
# stand in for what the wheel lacks.
PKG := dist/package-check
package-check: $(STAMP) services
	rm -rf $(PKG) && mkdir -p $(PKG)
	$(PY) -m pip wheel --quiet --no-deps --wheel-dir $(PKG) .
	$(PY) -c "import sys, zipfile; names = zipfile.ZipFile(sys.argv[1]).namelist(); \
		missing = {'outbox/py.typed', 'relay/py.typed'} - set(names); assert not missing, missing" \
		$(PKG)/*.whl
	$(PYTHON) -m venv $(PKG)/writer
	$(PKG)/writer/bin/pip install --quiet $(PKG)/*.whl
	cd $(PKG) && writer/bin/python -c "import outbox; from outbox import Event, install, write"
	$(PYTHON) -m venv $(PKG)/relay
	$(PKG)/relay/bin/pip install --quiet "$$(ls $(PKG)/*.whl)[relay]"
	cd $(PKG) && relay/bin/outbox-relay --help > /dev/null && relay/bin/outbox-relay --version
	cd $(PKG) && relay/bin/python $(CURDIR)/tests/docs/readme.py run "Embedding the writer"
	$(PKG)/relay/bin/pip install --quiet "$$(ls $(PKG)/*.whl)[relay,asyncio]"
	cd $(PKG) && relay/bin/python $(CURDIR)/tests/docs/readme.py run "Embedding the writer" --index 1
	$(PKG)/relay/bin/pip install --quiet "$$(ls $(PKG)/*.whl)[relay,alembic]"
	cd $(PKG) && relay/bin/python -c "import outbox.alembic; from alembic.operations import Operations; assert hasattr(Operations, 'create_outbox')"

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

bench: $(BENCH_STAMP) services
	$(PY) -m bench
	$(PY) -m bench.consumer --latency --rate 50

soak: $(STAMP) services
	OUTBOX_SOAK=1 $(PY) -m pytest tests/faults -m soak --timeout=1800

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache
