# The README's two set-up commands:
#   make demo   install into .venv, then distill the quickstart recipe on the built-in synthetic dataset
#   make test   install into .venv, then run the test suite but its heavy lane (make test-all, what .ci/run runs,
#               adds it)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The torch pair the project is tested with (this pair installs from the development machines' local disk).
# pyproject.toml keeps an open range for users installing kdforge into their own environments.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test test-all test-fast lint gpu-check clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_PINS)
	$(BIN)/python -m pip install --quiet -e '.[export,serve,dev]'
	touch $@

demo: install
	$(BIN)/kdforge distill recipes/quickstart.toml

# Everything but the heavy lane: the serving image (podman), the on-device runtimes' exports, the reference models
# at 224 and the two-process training runs
test: install
	$(BIN)/python -m pytest -m "not heavy"

# Everything, the heavy lane included, with the 25 slowest tests listed (what .ci/run runs)
test-all: install
	$(BIN)/python -m pytest --durations=25

# The edit-test loop: pure and unit tests, golden losses, recipes, plans and the CLI's errors; nothing trains
# (tests/conftest.py makes the training loop refuse to run in this lane), no test marked slow, heavy or gpu
test-fast: install
	$(BIN)/python -m pytest -m "not slow and not heavy and not gpu"

# On a machine with one NVIDIA GPU: the reference recipes at 224, exports, verification, TensorRT (see README)
gpu-check: install
	$(BIN)/python benchmarks/gpu_check.py

lint: install
	$(BIN)/ruff check kdforge tests benchmarks

clean:
	rm -rf runs .pytest_cache
