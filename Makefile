# Two entry points for a fresh machine:
#   make run    set up .venv (runtime + compile step), compile the embedded model for the CPU, generate
#   make test   set up .venv (plus the oracles) and run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROMPT ?= The function

.PHONY: run test setup setup-test clean-cache ptx

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The runtime alone would be `pip install .`; the main job also compiles, so it takes [compile].
$(VENV)/.setup-run: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[compile]"
	touch $@

# torch first and pinned: the CPU wheel on this machine's disk, never a CUDA build from the index.
$(VENV)/.setup-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[compile,oracle,test]"
	touch $@ $(VENV)/.setup-run

setup: $(VENV)/.setup-run
setup-test: $(VENV)/.setup-test

run: $(VENV)/.setup-run
	$(BIN)/iree-generate --prompt "$(PROMPT)" --max-tokens 64

test: $(VENV)/.setup-test
	$(BIN)/pytest -q $(PYTEST_ARGS)

clean-cache:
	rm -rf .cache ~/.cache/iree-runner

# The hand-written CUDA kernels' PTX (committed; needs nvcc): compile/kernels/*.cu -> .ptx
ptx: $(VENV)/.setup-run
	$(BIN)/python -m iree_runner.compile.extern
