"""Admission: what `max_queue` bounds, and that a closed-loop client fitting the slots is never
refused (the loop fed by the fabricated runtimes of test_scheduler)."""

import threading
import time

import pytest

from tritonllm.config import EngineConfig
from tritonllm.engine.inprocess import QueueSink
from tritonllm.engine.loop import EngineLoop
from tritonllm.engine.scheduler import Scheduler
from tritonllm.errors import ServerBusyError

from .engine_fakes import CountingRuntime, seq


def test_queue_bound_rejects_with_busy_error():
    """max_queue counts requests no free slot will take: with one free slot, 1 + 2 are accepted."""
    sch = Scheduler(EngineConfig(max_slots=1, max_queue=2))
    for _ in range(3):
        sch.add(seq([1]))
    with pytest.raises(ServerBusyError, match="queue is full.*raise max_queue"):
        sch.add(seq([1]))


def test_a_closed_loop_client_that_fits_the_slots_is_never_refused(Runtime):
    """max_queue 0 and 4 slots: 4 streams, each sending its next request as soon as its last one
    ended (a finished sequence frees its slot before its final response goes out), are never
    refused; a 5th request while 4 generate is."""
    runtime = Runtime(slots=4, delay=0.002)
    cfg = EngineConfig(
        max_slots=4,
        max_queue=0,
        max_tokens_limit=100,
        launch_ahead=getattr(runtime, "launch_ahead", 1),
        steps_per_launch=getattr(runtime, "steps_per_launch", 1),
        multi_step_min_active=1,
    )
    loop = EngineLoop(runtime, cfg).start()
    errors = []

    def stream():
        for _ in range(5):
            s = seq([1], max_tokens=3)
            s.sink = QueueSink()
            try:
                loop.submit(s)
            except ServerBusyError as e:
                errors.append(e)
                return
            assert s.sink.wait(10).ids == [2, 3, 4]

    try:
        threads = [threading.Thread(target=stream) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert errors == []
        long = [seq([1], max_tokens=900) for _ in range(4)]
        for s in long:
            s.sink = QueueSink()
            loop.submit(s)
        time.sleep(0.05)  # all four admitted: no free slot left
        with pytest.raises(ServerBusyError, match="raise max_queue"):
            loop.submit(seq([1], max_tokens=3))
    finally:
        loop.stop()


def test_cancellation_polls_follow_the_loops_step_time_within_bounds():
    """At most one poll round a step (a cancel takes effect at a step's end), never more often than
    CANCEL_POLL_S nor than CANCEL_POLLS_PER_S requests a second; long steps wait at most CANCEL_POLL_MAX_S."""
    from tritonllm.engine import loop

    assert loop.cancel_poll_period(8, 0.0) == loop.CANCEL_POLL_S
    assert loop.cancel_poll_period(8, 0.045) == 0.045  # a CPU engine's step
    assert loop.cancel_poll_period(1000, 0.004) == 1000 / loop.CANCEL_POLLS_PER_S
    assert loop.cancel_poll_period(100, 0.004) == 100 / loop.CANCEL_POLLS_PER_S
    assert loop.cancel_poll_period(8, 3.0) == loop.CANCEL_POLL_MAX_S  # a long prefill step


def test_the_loop_times_its_steps_while_busy_and_forgets_idle_gaps():
    eng = EngineLoop(CountingRuntime(2), EngineConfig(max_slots=2))
    eng._time_step(10.0)
    for t in (10.05, 10.10, 10.15, 10.20):
        eng._time_step(t)
    assert 0.02 < eng._step_s < 0.05  # moving toward 50 ms a step
    eng._last_complete = None  # an idle pass
    before = eng._step_s
    eng._time_step(99.0)
    assert eng._step_s == before
