"""Two Triton model instances sharing one engine process (`--io-processes 2`) behind a real Triton:
concurrent ensemble requests all get the ids of the loop in this process, one engine process serves
both instances (one process's counters on /metrics, not two), and a cancelled stream reaches it."""

import threading
from dataclasses import replace
from pathlib import Path

import pytest

from tritonllm.build.repository import RepositoryConfig, write_repository
from tritonllm.client import LLMClient
from tritonllm.config import EngineConfig
from tritonllm.engine.inprocess import InProcessEngine
from tritonllm.text import TokenizerFiles
from tritonllm.triton.scrape import metric_samples
from tritonllm.triton.server_process import TritonServer

from .helpers import cancel_reaches_engine, wait_for_metric

ENGINE = EngineConfig(
    max_slots=4, max_context=256, max_tokens_limit=200, threads=1, engine_process="on", io_processes=2
)
PROMPTS = ["The quick brown fox", "1, 2, 3,", "Once upon a time", "Paris is the capital of"] * 2


@pytest.fixture(scope="module")
def shared_server(tiny_dir, tiny_engine_dir, tmp_path_factory):
    repo = tmp_path_factory.mktemp("io_repo")
    write_repository(repo, RepositoryConfig(name="tinyio", engine=ENGINE), tiny_dir, tiny_engine_dir)
    with TritonServer(repo, log_dir=Path("build/logs/tests/io-processes")) as server:
        yield server


def test_concurrent_requests_through_two_io_processes_get_the_engines_ids(shared_server, tiny_dir, tiny_engine_dir):
    tok = TokenizerFiles(tiny_dir)
    with InProcessEngine(tiny_engine_dir, replace(ENGINE, engine_process="off", io_processes=1)) as eng:
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
