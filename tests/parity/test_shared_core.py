"""Several I/O sides sharing one engine process (`io_processes`): the first to start spawns it, the
others join through its socket; each side gets its own sequences' responses, a side that leaves has
its sequences cancelled, and when the spawner stops, every side's requests are answered."""

from __future__ import annotations

import time
import uuid

import pytest

from tritonllm.engine.core_process import EngineCoreClient, socket_path
from tritonllm.engine.inprocess import InProcessEngine

from .test_core_process import CFG, PROMPTS, submit


@pytest.fixture
def pair(tiny_engine_dir, tiny_dir):
    key = f"test-{uuid.uuid4()}"
    first = EngineCoreClient(CFG, tiny_engine_dir, tiny_dir, "cpu", share=key).start()
    second = EngineCoreClient(CFG, tiny_engine_dir, tiny_dir, "cpu", share=key).start()
    yield first, second
    second.stop()
    first.stop()


def test_two_sides_share_one_engine_process_and_each_gets_its_own_ids(pair, tiny_engine_dir):
    first, second = pair
    assert first.owner and not second.owner
    assert first.describe()["engine_process"] == second.describe()["engine_process"]
    params = dict(max_tokens=10, temperature=0.0, ignore_eos=True, stream=True)
    with InProcessEngine(tiny_engine_dir, CFG) as eng:
        want = [eng.generate(p, **params).ids for p in PROMPTS[:2]]
    sinks = [submit(first, PROMPTS[0], **params), submit(second, PROMPTS[1], **params)]
    assert [s.wait()[0] for s in sinks] == want
    deadline = time.monotonic() + 5
    while first.snapshot().stats.requests_finished.get("length", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)  # the counters reach the spawner only (every 0.25 s)
    assert first.snapshot().stats.requests_finished["length"] == 2
    assert second.snapshot().stats.requests_finished == {}


def test_a_side_that_leaves_has_its_sequences_cancelled(pair):
    first, second = pair
    long = submit(second, PROMPTS[2], max_tokens=200, ignore_eos=True, stream=True)
    long.q.get(timeout=60)  # it is generating
    t0 = time.monotonic()
    second.stop()
    assert time.monotonic() - t0 < 10
    assert isinstance(long.wait(), RuntimeError)  # answered on its side when it left
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        snap = first.snapshot()
        if snap.stats.requests_finished.get("cancelled") == 1 and snap.active == 0:
            break
        time.sleep(0.05)
    assert first.snapshot().stats.requests_finished.get("cancelled") == 1
    assert submit(first, PROMPTS[0], max_tokens=4, ignore_eos=True).wait()[3] == "length"


def test_when_the_spawner_stops_every_side_is_answered(tiny_engine_dir, tiny_dir):
    key = f"test-{uuid.uuid4()}"
    socket_path(key).write_text("")  # a socket file left by a server that died: replaced
    first = EngineCoreClient(CFG, tiny_engine_dir, tiny_dir, "cpu", share=key).start()
    second = EngineCoreClient(CFG, tiny_engine_dir, tiny_dir, "cpu", share=key).start()
    try:
        sink = submit(second, PROMPTS[0], max_tokens=200, ignore_eos=True, stream=True)
        sink.q.get(timeout=60)
        first.stop()
        got = sink.wait()
        assert isinstance(got, RuntimeError) and "shutting down" in str(got)
        second._receiver.join(10)  # the engine process's "bye" follows the errors
        with pytest.raises(RuntimeError, match="restart the model"):
            submit(second, PROMPTS[0])
    finally:
        second.stop()
