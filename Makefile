# The two commands of the README: `make demo` runs the product, `make test` runs the tests.
# Both install what they need into a local virtualenv first, from the lock files (exact versions).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch; on the project's machines this wheel lies on disk (no multi-GB CUDA download).
# It is installed before the lock so that a GPU build can be chosen: make TORCH="torch==2.13.0 --index-url ..."
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=
# The lock files: the web and CLI alone, plus the worker's training stack, plus the tests and the tools.
LOCKS := requirements.lock requirements-train.lock requirements-dev.lock
# `make lock LOCK_ARGS=--upgrade` moves every pin to the newest version the ranges in pyproject.toml allow.
LOCK_ARGS ?=
PIP_COMPILE = $(VENV)/bin/pip-compile -q --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links \
	--no-header --annotation-style=line $(LOCK_ARGS)
CHROMIUM := /usr/bin/chromium

.PHONY: install demo test test-fast lint lock test-chromium test-services bench-quick clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements-dev.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -r requirements-dev.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# `make demo PORT=8080` (or HOST=0.0.0.0) serves elsewhere.
PORT ?= 8000
HOST ?= 127.0.0.1

demo: install
	$(VENV)/bin/instructloop demo --host $(HOST) --port $(PORT)

test: test-chromium test-services install
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: test-services install
	$(PY) -m pytest -m "not slow and not browser" $(PYTEST_ARGS)

# What the tests need outside the virtualenv, checked before any test runs: Debian's chromium for the browser tests
# (installed here when we are root or have passwordless sudo), PostgreSQL and Redis (started by the machine or .ci/run).
test-chromium:
	@if [ ! -x $(CHROMIUM) ]; then \
	  if [ "$$(id -u)" = 0 ]; then sudo=; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else \
	    echo "make test: $(CHROMIUM) is missing; run: sudo apt-get install -y chromium"; exit 1; fi; \
	  echo "make test: installing Debian's chromium (apt-get install -y chromium)"; \
	  log=$$(mktemp); \
	  { $$sudo apt-get update -q && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -q chromium; } >$$log 2>&1 \
	    || { tail -5 $$log; echo "make test: installing chromium failed; run: sudo apt-get install -y chromium"; exit 1; }; \
	  rm -f $$log; [ -x $(CHROMIUM) ] || { echo "make test: chromium installed, yet $(CHROMIUM) is missing"; exit 1; }; \
	fi

test-services:
	@$(PYTHON) -c 'import socket; socket.create_connection(("127.0.0.1", 5432), 2).close()' 2>/dev/null || \
	  { echo "make test: PostgreSQL does not answer on 127.0.0.1:5432; start it (bash .ci/run starts it and Redis)"; exit 1; }
	@$(PYTHON) -c 'import socket; s = socket.create_connection(("127.0.0.1", 6379), 2); s.sendall(b"PING\r\n"); \
	  assert s.recv(7) == b"+PONG\r\n"' 2>/dev/null || \
	  { echo "make test: Redis does not answer on 127.0.0.1:6379; start it (bash .ci/run starts it and PostgreSQL)"; exit 1; }

lint: install
	$(VENV)/bin/ruff check app worker tests bench
	$(VENV)/bin/ruff format --check app worker tests bench
	$(VENV)/bin/mypy app worker

# Refreshes the lock files from pyproject.toml. The dev lock is the superset; the others are held to its versions.
# torch is pinned to $(TORCH)'s version without its local label (+cpu here), which matches the CPU and CUDA builds.
lock: install
	echo "$(firstword $(TORCH))" > $(VENV)/torch-pin.txt
	$(PIP_COMPILE) -c $(VENV)/torch-pin.txt --extra train --extra dev -o requirements-dev.lock pyproject.toml
	sed -i -E 's/^(torch==[^+ ]+)\+[a-z0-9.]+/\1/' requirements-dev.lock
	$(PIP_COMPILE) -c requirements-dev.lock --extra train -o requirements-train.lock pyproject.toml
	$(PIP_COMPILE) -c requirements-dev.lock -o requirements.lock pyproject.toml
	sed -i -E -e 's/^(torch==[^+ ]+)\+[a-z0-9.]+/\1/' -e 's/-c [^ ,]*(torch-pin.txt|requirements-dev.lock)(, )?//' \
	  -e 's/# via $$//' -e 's/ +$$//' -e '1i # Exact versions, written by `make lock` from pyproject.toml: do not edit by hand.' $(LOCKS)
	@! grep -n -E '^(nvidia-|triton==)' $(LOCKS) || { echo "make lock: CUDA packages in the locks (is the CPU torch wheel reachable?)"; exit 1; }
	@echo "make lock: $$(grep -c '==' requirements.lock) runtime, $$(grep -c '==' requirements-train.lock) train, $$(grep -c '==' requirements-dev.lock) dev pins"

clean:
	rm -rf $(VENV) instructloop-data
