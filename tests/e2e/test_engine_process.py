"""The engine loop in its own process (`--engine-process`) behind a real Triton: the ensemble's
greedy ids match the loop in this process, bad input is that request's error, a cancelled stream
reaches the engine process, and its counters reach /metrics. With `--io-processes 2`, two model
instances share one engine process: concurrent requests get the same ids, its counters are on
/metrics once, and cancellation reaches it."""

import threading
from dataclasses import replace

import pytest

from tritonllm.build.repository import RepositoryConfig
from tritonllm.client import GenerationError, LLMClient
from tritonllm.config import EngineConfig
from tritonllm.engine.inprocess import InProcessEngine
from tritonllm.text import TokenizerFiles
from tritonllm.triton.scrape import metric_samples

from .helpers import cancel_reaches_engine, engine_output_ids, metric_value, serve_tiny, wait_for_metric

ENGINE = EngineConfig(max_slots=4, max_context=256, max_tokens_limit=200, threads=1, engine_process="on")


def served(name: str, engine: EngineConfig, logs: str):
    """A module-scoped fixture: a real Triton serving the tiny model built with `engine`."""

    @pytest.fixture(scope="module")
    def server(tiny_dir, tiny_engine_dir, tmp_path_factory):
        cfg = RepositoryConfig(name=name, engine=engine)
        with serve_tiny(cfg, tiny_dir, tiny_engine_dir, tmp_path_factory, logs) as running:
            yield running

    return server


core_server = served("tinycore", ENGINE, "engine-process")


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
    # each I/O instance exports the TTFT of the requests it served, from its metrics thread
    ttft_count = "tritonllm_time_to_first_token_seconds_count"
    wait_for_metric(core_server, ttft_count, "tinycore_engine", lambda v: v >= 1, summed=True)


SHARED = replace(ENGINE, io_processes=2)
PROMPTS = ["The quick brown fox", "1, 2, 3,", "Once upon a time", "Paris is the capital of"] * 2


shared_server = served("tinyio", SHARED, "io-processes")


def test_concurrent_requests_through_two_io_processes_get_the_engines_ids(shared_server, tiny_dir, tiny_engine_dir):
    tok = TokenizerFiles(tiny_dir)
    with InProcessEngine(tiny_engine_dir, replace(SHARED, engine_process="off", io_processes=1)) as eng:
        want = [
            tok.decode(eng.generate(tok.encode(p), max_tokens=16, temperature=0.0, ignore_eos=True).ids)
            for p in PROMPTS
        ]
    got: dict[int, str] = {}

    def ask(i: int) -> None:
        with LLMClient(shared_server.grpc_url, "tinyio", timeout_s=120) as c:
            got[i] = c.generate(PROMPTS[i], max_tokens=16, temperature=0.0, ignore_eos=True).text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert [got.get(i) for i in range(len(PROMPTS))] == want
    tokens = wait_for_metric(shared_server, "tritonllm_tokens_generated_total", "tinyio_engine", lambda v: v >= 128)
    samples = [
        (labels, v)
        for n, labels, v in metric_samples(shared_server.metrics())
        if n == "tritonllm_slots_total" and labels.get("model") == "tinyio_engine"
    ]
    assert [v for _, v in samples] == [4] and tokens == 16 * len(PROMPTS)  # one engine's series, counted once


def test_cancel_reaches_the_shared_engine_process(shared_server, tiny_dir):
    cancel_reaches_engine(shared_server, "tinyio_engine", TokenizerFiles(tiny_dir).encode("Cancel me"))
