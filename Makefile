# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates (or reuses) a virtual environment in $(VENV), installs torch first
# ($(TORCH_SPEC); see README "Install" for CPU / CUDA), then this package with [dev].
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-deepspeed lint format install clean

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -e ".[dev]" $(EXTRA_PIP)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m slime_hf.demo $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -c "import torch, transformers, huggingface_hub; print('torch', torch.__version__, '| transformers', transformers.__version__, '| huggingface_hub', huggingface_hub.__version__)"
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

# ruff, configured in ruff.toml: `make lint` checks (lint rules, then formatting) and changes nothing; `make format`
# applies the formatter and the safe lint fixes (import order).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Not part of `make test`: installs the optional DeepSpeed extra (pure Python; its CPU backend compiles a small op
# with the system C++ compiler on first use) and runs the two-process ZeRO-2 / ZeRO-3 tests on the CPU.
test-deepspeed: $(STAMP)
	DS_BUILD_OPS=0 $(BIN)/python -m pip install --quiet -e ".[deepspeed]"
	DS_ACCELERATOR=cpu $(BIN)/python -m pytest tests -m deepspeed $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
