# slugkit: `make demo` runs SLUG on the embedded world; `make test` runs the test suite.
# Both create .venv themselves. torch/torchvision are pinned to the wheels cached on our machines.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.14.1 torchvision==0.29.1
DEMO_ARGS ?= --overwrite
# the suite runs one worker per core (pytest-xdist), a test file per worker so that a module's fixtures are built once;
# `make test PYTEST_ARGS=` runs it in one process
PYTEST_ARGS ?= -n auto --dist loadfile

.PHONY: demo test bench clean

$(BIN)/python:
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "slugkit needs Python >= 3.11"'
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-demo: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[demo]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

demo: $(VENV)/.installed-demo
	$(BIN)/slug demo $(DEMO_ARGS)

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# regenerates the committed figures on purpose (--overwrite); a failed stage leaves them as they were and fails
bench: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/summary.py --json benchmarks/results/summary.json --overwrite

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis src/*.egg-info
