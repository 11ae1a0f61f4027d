# One entry point. `make demo` and `make test` each set up .venv first (torch pinned via constraints.txt).
# The demo needs only the base package; the tests add the dev extra (megatron-core, pytest, ruff, hypothesis).
# pip byte-compiles serially (~14k files, ~80 s here); compileall uses every core and skips the ~400 model
# families transformers ships that we never import. Without .pyc files every process (each Ray actor too)
# recompiles what it imports when PYTHONDONTWRITEBYTECODE is set. A few vendored files target newer
# Pythons and never compile; pip ignores them and so do we (`|| true`).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check --no-compile -c constraints.txt
COMPILE := $(PY) -m compileall -q -j 0 -x '/transformers/models/(?!auto/|qwen2/|llama/|__init__)' \
	$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') > /dev/null 2>&1 || true

.PHONY: setup setup-base demo test lint bench analyze clean

setup: $(VENV)/.installed-dev
setup-base: $(VENV)/.installed-base

$(PY):
	python3 -m venv $(VENV)

$(VENV)/.installed-base: pyproject.toml constraints.txt | $(PY)
	$(PIP) -e .
	$(COMPILE)
	touch $@

$(VENV)/.installed-dev: pyproject.toml constraints.txt | $(PY)
	$(PIP) -e '.[dev]'
	$(COMPILE)
	touch $@ $(VENV)/.installed-base

demo: setup-base
	$(VENV)/bin/asyncopd demo

# SGLang's /generate contract for tests/test_sglang_contract.py: the pinned release's own wheel (39 MB, ~2 s, once per
# clone), its version the committed fixture's; offline the fetch fails quietly and the fixture stands in.
SGLANG_API := $(patsubst sglang-%.json,%,$(notdir $(firstword $(wildcard tests/sglang_contract/sglang-*.json))))
SGLANG_WHEEL := .cache/sglang/.fetched-$(SGLANG_API)

$(SGLANG_WHEEL): | $(PY)
	-$(PY) -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.11 \
		--platform manylinux_2_34_x86_64 -d .cache/sglang sglang==$(SGLANG_API) && touch $@

test: setup $(SGLANG_WHEEL)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -p no:cacheprovider

lint: setup
	$(VENV)/bin/ruff check .

bench: setup-base
	$(VENV)/bin/asyncopd bench --quick --out runs/bench

analyze: setup-base
	$(VENV)/bin/asyncopd analyze-estimators --out runs/estimators

clean:
	rm -rf runs .cache
