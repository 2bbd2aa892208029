# modelserve: `make run` serves the demo models, `make test` runs every check. See README.md.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000
PRESET ?= demo
SCENARIO ?= mixed-adapters
LOADTEST_ARGS ?=

.PHONY: install run build test lint bench loadtest clean

# torch is pinned by constraints.txt to the CPU wheel CI has on disk; a venv that already holds a
# torch build (a GPU user's own) keeps it and is installed without the pin.
$(STAMP): requirements.txt requirements-dev.txt constraints.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	if $(PY) -c "import torch" 2>/dev/null; then \
		$(PY) -m pip install -q -r requirements-dev.txt; \
	else \
		$(PY) -m pip install -q -c constraints.txt -r requirements-dev.txt; \
	fi
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

build: install
	$(PY) -m service build --preset $(PRESET)

run: build
	$(PY) -m service serve --host $(HOST) --port $(PORT)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest

bench: build
	$(PY) -m service bench --report

loadtest: install
	$(PY) -m loadtest --scenario $(SCENARIO) --host http://$(HOST):$(PORT) $(LOADTEST_ARGS)

clean:
	rm -rf $(VENV) reports/*.json reports/*.png
