# make test: create .venv, install spn with its test and CUDA-compile extras, run the tests.
# make demo: the proposal map of a built-in image, written to out/demo.png.
# On CPU machines torch is pinned to 2.13.0, for which a local CPU wheel exists; a loose
# `torch` would pull the multi-GB CUDA build. Override with e.g. `make test TORCH=torch==2.11.0`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
EXTRAS ?= test,cuda12
BIN := $(VENV)/bin

.PHONY: test demo bench venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

test: venv
	$(BIN)/python -m pytest -q

demo: venv
	$(BIN)/python -m spn demo --out out/demo.png

bench: venv
	$(BIN)/python -m spn bench

clean:
	rm -rf $(VENV) out .pytest_cache .hypothesis
