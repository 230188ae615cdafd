# `make demo` and `make test` each build their own virtualenv (.venv) on first use.
PYTHON ?= python3
VENV ?= .venv
# PyTorch is installed first and only if missing. The default takes this project's CPU build;
# on a GPU machine run e.g. `make demo TORCH=torch` (or pre-install torch in $(VENV)).
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
ARGS ?=
PYTEST_ARGS ?=

.PHONY: demo test bench clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/python -m vllm_utils.benchmark_vision_language --demo $(ARGS)

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
