# make test: create .venv, install spn-wsol (editable) with its `test` extra, run the tests.
#   The `test` extra is pytest, hypothesis, matplotlib, Pillow, the NVRTC library
#   (nvidia-cuda-nvrtc-cu12: the compile check of the CUDA sources), opencv-python-headless,
#   ruff and mypy; not CuPy. On a GPU machine: `make test EXTRAS=test,cuda12`.
# make lint: ruff on everything and mypy on the typed package spn (both run; fails when either fails).
# make demo: the pipeline end to end at a small size: generate the digits benchmark, train SPN
#   and CAM for 2 epochs, evaluate both (out/demo/results.md, out/demo/pictures/), then the
#   proposal map of a built-in image (out/demo/proposal.png). Re-running keeps finished runs.
# On CPU machines torch is pinned to 2.13.0, for which a local CPU wheel exists; a loose
# `torch` would pull the multi-GB CUDA build. Override with e.g. `make test TORCH=torch==2.11.0`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
EXTRAS ?= test
BIN := $(VENV)/bin

.PHONY: test lint demo bench benchmark venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

test: venv
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/python -m ruff check .; ruff=$$?; $(BIN)/python -m mypy spn; mypy=$$?; \
	test $$ruff -eq 0 -a $$mypy -eq 0

demo: venv
	$(BIN)/python -m spn compare --out out/demo --variants small_sp small_cam --seeds 0 --epochs 2 \
		--widths 16 32 64 --interval 0.01
	$(BIN)/python -m spn demo --out out/demo/proposal.png

# make benchmark: SPN (exact stationary state and spn.RELEASED's walk), CAM and the seed methods
#   on the digits benchmark, 3 seeds each, same budget; tables, pictures and timings in
#   benchmarks/results/wsol_digits/ (see docs/benchmark.md). Re-running resumes and keeps finished runs.
BENCHMARK_VARIANTS ?= small_sp small_cam small_sp:released small_cam+ae small_cam+acol \
	small_cam+spa,start_epoch=3 small_cam+i2c small_cam+danet small_cam+icl
benchmark: venv
	$(BIN)/python benchmarks/wsol_digits.py --out benchmarks/results/wsol_digits --variants $(BENCHMARK_VARIANTS)

bench: venv
	$(BIN)/python -m spn bench

clean:
	rm -rf $(VENV) out .pytest_cache .hypothesis .mypy_cache .ruff_cache
