# The two commands of the README: `make demo` runs the product, `make test` runs the tests.
# Both install what they need into a local virtualenv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch; on the project's machines this wheel lies on disk (no multi-GB CUDA download).
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install demo test test-fast bench-quick clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[train,dev]'
	touch $@

demo: install
	$(VENV)/bin/instructloop demo

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow and not browser" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) instructloop-data
