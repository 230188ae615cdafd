# `make demo` and `make test` each build their own virtualenv (.venv) on first use.
PYTHON ?= python3
VENV ?= .venv
# PyTorch is installed first, and only if the venv lacks it (pre-install any build in $(VENV) to keep it).
# TORCH is the pip spec. Without an NVIDIA GPU the CPU build comes from PyTorch's CPU wheel index (about
# 200 MB; PyPI's Linux x86_64 wheel is the ~2.7 GB CUDA build), or from the default index when the CPU one
# cannot be reached. With a GPU: the default index's (CUDA) build. TORCH_INDEX=URL forces an index.
TORCH ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_INDEX ?= $(if $(HAS_NVIDIA_GPU),,$(TORCH_CPU_INDEX))
HAS_NVIDIA_GPU := $(shell { test -e /proc/driver/nvidia || command -v nvidia-smi; } >/dev/null 2>&1 && echo yes)
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
ARGS ?=
PYTEST_ARGS ?=
# Exact versions of everything beside torch (what CI installs); LOCK= installs the newest releases instead.
LOCK ?= requirements/test-lock.txt
LATEST_VENV ?= .venv-latest

.PHONY: demo test test-latest lock install install-torch torch-info clean

$(BIN)/.installed: pyproject.toml Makefile $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(MAKE) --no-print-directory install-torch
ifeq ($(LOCK),)
	$(PIP) install -q -e ".[test]"
else
	@# with an NVIDIA GPU, torch's CUDA build pins its own triton
	grep -v $(if $(HAS_NVIDIA_GPU),'^triton==','^$$') $(LOCK) > $(VENV)/constraints.txt
	$(PIP) install -q -c $(VENV)/constraints.txt -e ".[test]"
endif
	@$(MAKE) --no-print-directory torch-info
	touch $@

install-torch:
ifeq ($(TORCH_INDEX),)
	@echo "Installing $(TORCH) from the default index (NVIDIA GPU found: the CUDA build, about 2.7 GB with its libraries)"
	$(PIP) install -q "$(TORCH)"
else
	@echo "Installing $(TORCH) from $(TORCH_INDEX) (no NVIDIA GPU: the CPU build, about 200 MB)"
	$(PIP) install -q --timeout 10 --retries 0 --index-url "$(TORCH_INDEX)" "$(TORCH)" || { \
	  echo "note: $(TORCH_INDEX) is unreachable or lacks $(TORCH); installing it from the default index"; \
	  $(PIP) install -q "$(TORCH)"; }
endif

install: $(BIN)/.installed

# What torch resolved to: version, CUDA or CPU build, and the size of what was installed.
torch-info:
	@$(BIN)/python -c "import torch, os; cuda = torch.version.cuda; \
	  print('torch', torch.__version__, f'(CUDA {cuda} build)' if cuda else '(CPU build)', 'at', os.path.dirname(torch.__file__)); \
	  cuda and not '$(HAS_NVIDIA_GPU)' and print('note: a CUDA build on a machine without an NVIDIA GPU; make clean, then make TORCH_INDEX=$(TORCH_CPU_INDEX)')"
	@du -sh $(VENV) | awk '{print "venv size:", $$1}'

demo: $(BIN)/.installed
	$(BIN)/python -m vllm_utils.benchmark_vision_language --demo $(ARGS)

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The suite against the newest release of every dependency but torch (kept at the venv's), in a venv of its own:
# what the next `make lock` would take, and what users who `pip install` the package get.
test-latest:
	@$(MAKE) --no-print-directory install VENV=$(LATEST_VENV) LOCK=
	$(LATEST_VENV)/bin/python -c "import torch; print('torch==' + torch.__version__)" > $(LATEST_VENV)/torch-pin.txt
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -c $(LATEST_VENV)/torch-pin.txt \
	  -e ".[test]"
	@$(LATEST_VENV)/bin/python -m pip freeze --exclude-editable | grep -iE '^(transformers|tokenizers|numpy|pillow|triton)==' \
	  | tr '\n' ' '; echo
	$(LATEST_VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

# Writes the lock from the newest releases, once `make test-latest` has passed on them.
lock: test-latest
	{ sed -n '/^#/p' $(LOCK); $(LATEST_VENV)/bin/python -m pip freeze --exclude-editable --exclude torch; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)

clean:
	rm -rf $(VENV) $(LATEST_VENV) *.egg-info .pytest_cache
