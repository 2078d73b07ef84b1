"""The engine loop in its own process (`engine_process`) against the loop in this process: same
greedy ids and log-probabilities, cancellation, a full queue answered as that request's error, and
every request answered when the engine process dies."""

from __future__ import annotations

import os
import pickle
import queue
import signal

import pytest

from tritonllm.config import EngineConfig, SamplingParams
from tritonllm.engine.core_process import EngineCoreClient, Failure, Response, _as_response, _Outbox
from tritonllm.engine.inprocess import InProcessEngine
from tritonllm.engine.request import DictReader, build_sequence
from tritonllm.engine.sequence import Sequence
from tritonllm.errors import ServerBusyError

CFG = EngineConfig(max_slots=2, max_context=256, max_queue=2, max_tokens_limit=200, threads=1)
PROMPTS = [[1, 5, 9, 13], [2, 4, 6, 8, 10, 12], [7] * 9, [3, 1, 4, 1, 5, 9, 2, 6]]


class CountedQueueSink:
    """Collects responses the way the Triton sink gets them (counts made by the engine process)."""

    def __init__(self):
        self.q: queue.Queue = queue.Queue()
        self.cancelled = False

    def send_counted(self, seq, ids, n_context, final, n_output, logprobs_from):
        self.q.put((ids[n_context:], final, n_output, list(seq.logprobs[:n_output]), seq.finish_reason))

    def send_error(self, seq, error):
        self.q.put((error, True, 0, [], "error"))

    def is_cancelled(self):
        return self.cancelled

    def wait(self, timeout_s: float = 60.0):
        ids = []
        while True:
            got, final, n_output, logprobs, reason = self.q.get(timeout=timeout_s)
            if isinstance(got, Exception):
                return got
            ids += got
            if final:
                return ids, n_output, logprobs, reason


def submit(core, prompt, **params):
    seq = build_sequence(DictReader({"input_ids": prompt, **params}), CFG, core.shape)
    seq.sink = CountedQueueSink()
    core.submit(seq)
    return seq.sink


@pytest.fixture
def core(tiny_engine_dir, tiny_dir):
    client = EngineCoreClient(CFG, tiny_engine_dir, tiny_dir, "cpu").start()
    yield client
    client.stop()


def test_same_ids_and_logprobs_as_the_loop_in_this_process(core, tiny_engine_dir):
    params = dict(max_tokens=12, temperature=0.0, ignore_eos=True, stream=True, return_log_probs=True)
    with InProcessEngine(tiny_engine_dir, CFG) as eng:
        expected = [eng.generate(p, **params) for p in PROMPTS[:2]]
    sinks = [submit(core, p, **params) for p in PROMPTS[:2]]
    for sink, want in zip(sinks, expected):
        ids, n_output, logprobs, reason = sink.wait()
        assert ids == want.ids and n_output == 12 and reason == "length"
        assert logprobs == pytest.approx(want.logprobs, abs=1e-5)
    snap = core.snapshot()
    assert snap.slots == 2


def test_cancelled_request_ends_with_its_final_response(core):
    sink = submit(core, PROMPTS[0], max_tokens=200, ignore_eos=True, stream=True)
    first = sink.q.get(timeout=60)
    assert first[0] and not first[1]
    sink.cancelled = True
    ids, _, _, reason = sink.wait()
    assert reason == "cancelled"


def test_full_queue_is_that_requests_error_and_the_others_finish(core):
    sinks = [submit(core, p, max_tokens=40, ignore_eos=True) for p in PROMPTS * 2]  # 2 slots + 2 queued
    results = [s.wait() for s in sinks]
    busy = [r for r in results if isinstance(r, ServerBusyError)]
    done = [r for r in results if not isinstance(r, Exception)]
    assert busy and "max_queue" in str(busy[0])
    assert len(busy) + len(done) == len(sinks) and all(r[3] == "length" for r in done)


def test_every_request_answered_when_the_engine_process_dies(tiny_engine_dir, tiny_dir):
    client = EngineCoreClient(CFG, tiny_engine_dir, tiny_dir, "cpu").start()
    try:
        sinks = [submit(client, p, max_tokens=200, ignore_eos=True) for p in PROMPTS[:3]]
        os.kill(client.describe()["engine_process"], signal.SIGKILL)
        results = [s.wait() for s in sinks]
        assert all(isinstance(r, RuntimeError) and "exited" in str(r) for r in results)
        with pytest.raises(RuntimeError, match="restart the model"):
            submit(client, PROMPTS[0])
    finally:
        client.stop()


def test_responses_travel_as_plain_tuples_in_the_loops_order():
    """The engine process sends a loop pass's responses as plain tuples (cheap to build, pickle and
    read back at a thousand a step), other events as they are, in the order the loop made them; the
    I/O side reads each tuple back as the `Response` it was."""
    sent = []

    class Pipe:
        def send(self, message):
            sent.append(pickle.loads(pickle.dumps(message)))

    outbox = _Outbox(Pipe())
    a, b = (Sequence([1, 2, 3], SamplingParams(max_tokens=4), frozenset({2}), None) for _ in range(2))
    a.output_ids = [5, 6]
    outbox.send(a, [5, 6], 0, False)
    outbox.send_error(b, ValueError("bad"))
    a.finish_reason, a.reused_tokens = "length", 16
    outbox.send(a, [6, 7], 1, True)
    outbox.flush()
    ((kind, events, _),) = sent
    assert kind == "events" and [type(e) for e in events] == [tuple, Failure, tuple]
    first, last = (_as_response(e) for e in (events[0], events[2]))
    assert first == Response(a.uid, [5, 6], 0, False, 2, 0, None, None, None, 0)
    assert (last.uid, last.ids, last.n_context, last.final, last.finish_reason, last.reused_tokens) == (
        a.uid,
        [6, 7],
        1,
        True,
        "length",
        16,
    )
    assert events[1].uid == b.uid and isinstance(events[1].error, RuntimeError)
