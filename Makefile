# The two commands of the README. Each creates/refreshes .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch; on a GPU box set TORCH_SPEC=torch (CUDA wheels) before `make`.
TORCH_SPEC ?= torch==2.13.0
# pip byte-compiles the installed files one after another; compiling them afterwards on every core is faster (back
# to back on 2 cores, the main install took 99 s before and 86 s after). The .pyc files must exist: where
# PYTHONDONTWRITEBYTECODE is set, every Ray worker would otherwise compile torch again. Files that only a newer
# Python parses fail here, as they do under pip.
PIP_INSTALL = $(VENV)/bin/pip -q --disable-pip-version-check install --no-compile
BYTE_COMPILE = $(VENV)/bin/python -m compileall -q -j 0 $(VENV)/lib > /dev/null 2>&1 || true

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PIP_INSTALL) "$(TORCH_SPEC)"
	$(PIP_INSTALL) -e .
	$(BYTE_COMPILE)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP_INSTALL) -e ".[test]"
	$(BYTE_COMPILE)
	touch $@

.PHONY: demo test test-gpu cluster-up cluster-down clean
demo: $(VENV)/.installed  ## the quickstart on the embedded default: local Ray, local disk, bundled data, CPU
                          ## (DEMO_ARGS="profile=smoke" for the few-minute version CI runs)
	$(VENV)/bin/memory3 quickstart out=runs/quickstart $(DEMO_ARGS)

test: $(VENV)/.installed-test  ## the CPU test suite
	$(VENV)/bin/python -m pytest -m "not gpu" -q $(PYTEST_ARGS)

test-gpu: $(VENV)/.installed-test  ## the GPU tests (on a CUDA machine)
	$(VENV)/bin/python -m pytest -m gpu -q $(PYTEST_ARGS)

cluster-up: $(VENV)/.installed  ## a local multi-node Ray cluster (head + worker), dashboard on 127.0.0.1:8265
	$(VENV)/bin/python -m memory3.cluster up

cluster-down:  ## stops only the cluster cluster-up started
	$(VENV)/bin/python -m memory3.cluster down

clean:
	rm -rf $(VENV) runs
