"""The engine loop in its own process (`--engine-process`) behind a real Triton: the ensemble's
greedy ids match the loop in this process, bad input is that request's error, a cancelled stream
reaches the engine process, and its counters reach /metrics."""

from dataclasses import replace
from pathlib import Path

import pytest

from tritonllm.build.repository import RepositoryConfig, write_repository
from tritonllm.client import GenerationError, LLMClient
from tritonllm.config import EngineConfig
from tritonllm.engine.inprocess import InProcessEngine
from tritonllm.text import TokenizerFiles
from tritonllm.triton.server_process import TritonServer

from .helpers import cancel_reaches_engine, engine_output_ids, metric_value, wait_for_metric

ENGINE = EngineConfig(max_slots=4, max_context=256, max_tokens_limit=200, threads=1, engine_process="on")


@pytest.fixture(scope="module")
def core_server(tiny_dir, tiny_engine_dir, tmp_path_factory):
    repo = tmp_path_factory.mktemp("core_repo")
    write_repository(repo, RepositoryConfig(name="tinycore", engine=ENGINE), tiny_dir, tiny_engine_dir)
    with TritonServer(repo, log_dir=Path("build/logs/tests/engine-process")) as server:
        yield server


def test_ids_match_the_loop_in_this_process(core_server, tiny_dir, tiny_engine_dir):
    tok = TokenizerFiles(tiny_dir)
    prompts = [tok.encode(p) for p in ("The quick brown fox", "1, 2, 3,")]
    with InProcessEngine(tiny_engine_dir, replace(ENGINE, engine_process="off")) as eng:
        expected = [eng.generate(p, max_tokens=20, temperature=0.0, ignore_eos=True).ids for p in prompts]
    got = [engine_output_ids(core_server.grpc_url, "tinycore_engine", p, 20) for p in prompts]
    assert got == expected
    with LLMClient(core_server.grpc_url, "tinycore", timeout_s=60) as c:
        r = c.generate("The quick brown fox", max_tokens=20, temperature=0.0, ignore_eos=True)
    assert r.num_output_tokens == 20 and r.text == tok.decode(expected[0])


def test_bad_input_is_that_requests_error(core_server):
    with LLMClient(core_server.grpc_url, "tinycore", timeout_s=60) as c:
        with pytest.raises(GenerationError, match="top_p"):
            c.generate("hello", max_tokens=4, top_p=2.0)
        assert c.generate("still serving", max_tokens=4, temperature=0.0).num_output_tokens >= 1


def test_cancel_reaches_the_engine_process(core_server, tiny_dir):
    cancel_reaches_engine(core_server, "tinycore_engine", TokenizerFiles(tiny_dir).encode("Cancel me"))


def test_counters_reach_metrics(core_server):
    with LLMClient(core_server.grpc_url, "tinycore", timeout_s=60) as c:
        c.generate("count me", max_tokens=8, temperature=0.0, ignore_eos=True)
    wait_for_metric(core_server, "tritonllm_tokens_generated_total", "tinycore_engine", lambda v: v >= 8)
    assert metric_value(core_server, "tritonllm_slots_total", "tinycore_engine") == 4
    assert metric_value(core_server, "tritonllm_time_to_first_token_seconds_count", "tinycore_engine") >= 1
