# Two commands do all the set-up on a fresh machine:
#   make demo   virtualenv + CPU torch + package + embedded model, then the Beethoven pipeline
#   make test   the same set-up, then the test suite
#   make test-tinker  the opt-in Tinker tests on SkyRL's Tinker API server, on 127.0.0.1
#                     (its own Python 3.12 venv, ~6.7 GB, set up once: tinker_server/)
#   make test-gguf  builds llama.cpp once (~5 min), then checks an exported GGUF runs in it
#   make test-browser  serve's page in headless Chromium alone (Debian's chromium and
#                      chromium-driver, which `make test` also installs when it can)
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
DISTILL = $(VENV)/bin/distill
# The CPU build of torch is installed first and pinned: a bare `torch` requirement with no
# torch installed would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
# uv installs (pip only installs uv): the demo's set-up measured 34 s against pip's 52-74 s,
# cold and warm caches alike, the same packages and versions (bench/README.md). Bytecode is
# compiled at install, as pip does: without it, a machine with PYTHONDONTWRITEBYTECODE set
# recompiles torch and transformers at every start (6 s -> 13 s to import, measured).
UV      = $(VENV)/bin/uv
INSTALL = $(UV) pip install --python $(PY) --quiet --compile-bytecode
ifdef PIP_FIND_LINKS  # wheels pip is told to look in (a local CPU torch, for one) are uv's too
export UV_FIND_LINKS ?= $(PIP_FIND_LINKS)
endif

.PHONY: setup setup-dev model demo test test-tinker test-gguf test-browser browser bench compare clean

# The demo needs the package alone; the tests add pytest, the Tinker SDK and what the
# tests read back (11 s of the demo's set-up when installed with it, measured).
setup: $(VENV)/.installed
setup-dev: $(VENV)/.installed-dev

$(UV):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet uv

$(VENV)/.installed: pyproject.toml | $(UV)
	$(INSTALL) $(TORCH)
	$(INSTALL) -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed | $(UV)
	$(INSTALL) -e '.[dev,tinker]'
	touch $@

model: setup
	$(DISTILL) models fetch smollm2-135m

demo: model
	$(DISTILL) run examples/beethoven/config.yaml

test: model setup-dev
	-@$(MAKE) --no-print-directory browser
	$(PY) -m pytest -q

test-tinker: model setup-dev
	tinker_server/run_tests.sh $(PY)

# llama.cpp's llama-simple, built once under $PROMPTDISTILL_HOME/llama.cpp (tests/build_llama_cpp.py);
# `make test` skips this test unless that binary exists.
test-gguf: model setup-dev
	$(PY) tests/build_llama_cpp.py
	$(PY) -m pytest -q -s tests/test_export.py -k llama_cpp

# serve's page in headless Chromium (tests/test_serve_page.py) needs Debian's chromium and
# chromium-driver, installed once (apt-get: 59 s, 164 MB, measured). `make test` installs them
# when missing and goes on if apt cannot (no root, no apt): the browser test then skips with its
# reason. `make test-browser` insists on them and runs that test alone. The test drives
# chromedriver over plain HTTP (tests/webdriver.py): no Python package beyond the dev extra.
SUDO = $(if $(filter 0,$(shell id -u)),,sudo)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium chromium-driver; }

test-browser: model setup-dev browser
	$(PY) -m pytest -q tests/test_serve_page.py

bench: model
	$(INSTALL) -e '.[dev,bench]'
	$(PY) bench/run.py

# sft, kl, on_policy and kl then on_policy on the demo's teacher answers, at one step budget
# and at one wall-clock budget: bench/results/objectives-*.md (runs the demo first if needed)
compare: demo
	$(PY) bench/compare_objectives.py --from runs/beethoven

clean:
	rm -rf $(VENV) runs
