# Two commands do all the set-up on a fresh machine:
#   make demo   virtualenv + CPU torch + package + embedded model, then the Beethoven pipeline
#   make test   the same set-up, then the test suite
#   make test-gguf  builds llama.cpp once (~5 min), then checks an exported GGUF runs in it
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
DISTILL = $(VENV)/bin/distill
# The CPU build of torch is installed first and pinned: a bare `torch` requirement with no
# torch installed would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: setup model demo test test-gguf bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev,tinker]'
	touch $@

model: setup
	$(DISTILL) models fetch smollm2-135m

demo: model
	$(DISTILL) run examples/beethoven/config.yaml

test: model
	$(PY) -m pytest -q

# llama.cpp's llama-simple, built once under $PROMPTDISTILL_HOME/llama.cpp (tests/build_llama_cpp.py);
# `make test` skips this test unless that binary exists.
test-gguf: model
	$(PY) tests/build_llama_cpp.py
	$(PY) -m pytest -q -s tests/test_export.py -k llama_cpp

bench: model
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) runs
