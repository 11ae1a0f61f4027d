# One entry point. `make demo` and `make test` each set up .venv first (torch pinned via constraints.txt).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench analyze clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/asyncopd demo

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -p no:cacheprovider

bench: setup
	$(VENV)/bin/asyncopd bench --quick --out runs/bench

analyze: setup
	$(VENV)/bin/asyncopd analyze-estimators --out runs/estimators

clean:
	rm -rf runs .cache
