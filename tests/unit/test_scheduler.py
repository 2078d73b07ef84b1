"""The scheduler and engine loop fed by a fabricated runtime: in-flight joins and leaves,
queue bounds, stop conditions, cancellation and failures; no model involved."""

import threading
import time
from dataclasses import replace

import pytest

from tritonllm.config import EngineConfig, SamplingParams
from tritonllm.engine.inprocess import QueueSink
from tritonllm.engine.loop import EngineLoop
from tritonllm.engine.sampling import new_rng
from tritonllm.engine.scheduler import Scheduler, should_stop
from tritonllm.engine.sequence import Sequence, StepPlan
from tritonllm.runtimes.base import Sampled, StepInput

from .engine_fakes import (
    EOS,
    ChunkedRuntime,
    CountingRuntime,
    MultiStepRuntime,
    OverlappingRuntime,
    run_loop,
    run_step,
    seq,
)


def test_tokens_and_length_finish(Runtime):
    cfg = EngineConfig(max_slots=2, max_tokens_limit=100)
    rt = Runtime()
    (res,), _ = run_loop(rt, cfg, [seq([5], max_tokens=4)])
    assert res.ids == [6, 7, 8, 9] and res.finish_reason == "length"
    if isinstance(rt, MultiStepRuntime):  # prefill, then one run of 3 decode steps
        assert rt.batches == [1, 1, 1, 1] and rt.device_token_steps == 1 and rt.in_flight == 0
    elif isinstance(rt, OverlappingRuntime):  # steps really were launched ahead of the host
        assert rt.device_token_steps == 3 and rt.batches == [1, 1, 1, 1]
        assert rt.max_in_flight == rt.launch_ahead + 1 and rt.in_flight == 0


def test_a_pending_token_that_ends_the_sequence_keeps_it_out_of_the_next_step():
    """Overlapped scheduling: a sequence whose in-flight token reaches max_tokens or the context
    sits out; the others decode at their position + 1, reading their last token on the device."""
    sch = Scheduler(EngineConfig(max_slots=3, max_context=64, max_tokens_limit=60, default_max_tokens=16))
    ending, going, full = seq([1, 2], max_tokens=3), seq([1, 2], max_tokens=10), seq([1] * 53, max_tokens=50)
    for s in (ending, going, full):
        sch.add(s)
    plan = sch.schedule()
    assert [x.step_input() for x in plan.prefill][0] == StepInput(0, [1, 2], 0)
    sch.update_from_output(plan, [7, 7, 7])
    ending.output_ids.append(8)
    full.output_ids.append(8)  # length 55
    sch.launched(plan)
    nxt = sch.schedule()
    assert nxt.decode == [going, full]
    assert going.step_input() == StepInput(1, (), 3)  # prompt 2 + 1 out, +1 pending
    full.output_ids += [8] * 8  # 63 tokens + 1 pending == max_context
    assert sch.schedule().decode == [going]
    ending.finish_reason = "cancelled"
    assert sch.update_from_output(plan, [9, 9, 9]) == [full]  # 64 tokens: the context is full
    assert ending.output_ids == [7, 8] and going.output_ids == [7, 9]  # a cancelled one drops its token
    assert going.pending == 0 and full.finish_reason == "length"


def test_multi_step_runs_are_clipped_and_their_tokens_cut_at_a_stop():
    """A run of decode steps only while enough sequences decode and none waits for a free slot;
    clipped so no sequence outruns its context or changes its EOS masking; tokens past a length
    limit, EOS or stop word are dropped."""
    cfg = EngineConfig(
        max_slots=4,
        max_context=64,
        max_tokens_limit=60,
        default_max_tokens=16,
        steps_per_launch=4,
        multi_step_min_active=2,
    )
    sch = Scheduler(cfg, max_steps=4)
    a, b = seq([1] * 10, max_tokens=6), seq([1] * 10, max_tokens=50, stop_ids=[[5, 6]])
    for s in (a, b):
        sch.add(s)
    first = sch.schedule()
    assert first.steps == 1 and first.prefill == [a, b]  # prefill steps are single
    sch.launched(first)
    run = sch.schedule()
    assert run.decode == [a, b] and run.steps == 4
    sch.launched(run)
    assert sch.update_from_output(first, [2, 2]) == [] and a.pending == 4
    assert sch.update_from_output(run, [[3, 4, 5, 6], [3, 5, 6, 7]]) == [b]
    assert a.output_ids == [2, 3, 4, 5, 6] and b.output_ids == [2, 3, 5, 6] and b.finish_reason == "stop"
    assert sch.update_from_output(StepPlan([], [a], 4), [[7, 8, 9, 10]]) == [a]  # past max_tokens=6: dropped
    assert a.output_ids == [2, 3, 4, 5, 6, 7] and a.finish_reason == "length"

    c, d = seq([1] * 60, max_tokens=4), seq([1] * 10, max_tokens=20, min_tokens=3)
    e = Sequence([1] * 10, SamplingParams(temperature=0.0, max_tokens=20), frozenset({EOS}), new_rng(0))
    for s in (c, d, e):
        s.output_ids, s.slot = [2], None
        sch.running.append(s)
    assert sch._steps_for([c, d, e]) == 2  # min_tokens: d's EOS stays masked for 2 more tokens
    c.output_ids = [2, 2, 2]
    assert sch._steps_for([c, e]) == 2  # c (63 tokens) decodes at 62 and 63, the last of its context
    assert sch._steps_for([e]) == 1  # fewer than multi_step_min_active decode
    penalized = seq([1] * 10, max_tokens=20, repetition_penalty=1.2)
    penalized.output_ids = [2]
    assert sch._steps_for([d, penalized]) == 1  # the penalty reads each token on the host
    sch.waiting.append(seq([1]))
    assert sch._steps_for([d, e]) == 1  # a request waits and a slot is free: prefill it first
    sch.free_slots.clear()
    assert sch._steps_for([d, e]) == 2


def test_eos_ends_without_being_emitted_and_min_tokens_delays_it(Runtime):
    cfg = EngineConfig(max_slots=2, max_tokens_limit=100)
    (a, b), _ = run_loop(Runtime(eos_after=3), cfg, [seq([5], max_tokens=10), seq([5], max_tokens=10, min_tokens=4)])
    assert a.ids == [6, 7] and a.finish_reason == "stop"
    assert len(b.ids) >= 4 and EOS not in b.ids[:4]


def test_stop_ids_end_generation_and_are_emitted(Runtime):
    cfg = EngineConfig(max_slots=2, max_tokens_limit=100)
    (res,), _ = run_loop(Runtime(), cfg, [seq([5], max_tokens=20, stop_ids=[[8, 9]])])
    assert res.ids == [6, 7, 8, 9] and res.finish_reason == "stop"


def test_in_flight_batching_joins_and_leaves(Runtime):
    """Four sequences of different lengths through two slots: later ones join as earlier leave,
    decode steps are shared, and only two slots are ever used."""
    rt = Runtime(slots=2, delay=0.002)
    cfg = EngineConfig(max_slots=2, max_tokens_limit=100)
    seqs = [seq([1], max_tokens=n) for n in (3, 12, 5, 7)]
    results, loop = run_loop(rt, cfg, seqs)
    assert [len(r.ids) for r in results] == [3, 12, 5, 7]
    assert rt.slots_seen == {0, 1}
    assert max(rt.batches) == 2 and loop.stats.batched_decode_steps > 0
    assert loop.stats.requests_finished == {"length": 4}
    st = loop.stats  # what /metrics publishes: every sequence prefilled once, every step timed
    assert st.prefilled == 4 and 2 <= st.prefill_steps <= 4
    assert st.steps >= 12 and st.launch_s > 0 and st.complete_s > 0
    assert st.tokens_generated == 3 + 12 + 5 + 7  # the tokens kept, as tritonllm_tokens_generated_total


def test_cancellation_frees_the_slot_and_sends_a_final_response(Runtime):
    rt = Runtime(slots=1, delay=0.005)
    cfg = EngineConfig(max_slots=1, max_tokens_limit=1000, max_context=2048)
    loop = EngineLoop(rt, cfg).start()
    try:
        s1, s2 = seq([1], max_tokens=900, stream=True), seq([1], max_tokens=3)
        s1.sink, s2.sink = QueueSink(), QueueSink()
        loop.submit(s1)
        loop.submit(s2)
        time.sleep(0.05)
        s1.sink.cancelled = True
        r1, r2 = s1.sink.wait(10), s2.sink.wait(10)
        assert r1.finish_reason == "cancelled" and 0 < len(r1.ids) < 900
        assert r2.ids == [2, 3, 4]
        assert loop.scheduler.active == 0 and loop.scheduler.free_slots == [0]
    finally:
        loop.stop()


def test_deadline_ends_a_request_with_timeout(Runtime):
    cfg = EngineConfig(max_slots=1, max_tokens_limit=1000, max_context=2048, request_timeout_s=0.05)
    (res,), _ = run_loop(Runtime(delay=0.005), cfg, [seq([1], max_tokens=900)])
    assert res.finish_reason == "timeout"


def test_failed_step_errors_its_sequences_and_loop_keeps_serving(Runtime):
    rt = Runtime(fail_on=3)
    cfg = EngineConfig(max_slots=2, max_tokens_limit=100)
    (bad,), loop = run_loop(rt, cfg, [seq([1], max_tokens=5)])
    assert isinstance(bad.error, RuntimeError)
    (good,), _ = run_loop(rt, cfg, [seq([10], max_tokens=2)])
    assert good.ids == [11, 12]


def test_should_stop_on_stop_string_through_decode():
    s = seq([1], max_tokens=50, stop_strings=["END"])
    s.output_ids = [1, 2, 3]
    assert should_stop(s, 1024, decode=lambda ids: "fooEN") is None
    assert should_stop(s, 1024, decode=lambda ids: "foo END") == "stop"


def test_submit_from_many_threads(Runtime):
    rt = Runtime(slots=4)
    cfg = EngineConfig(max_slots=4, max_queue=64, max_tokens_limit=100)
    loop = EngineLoop(rt, cfg).start()
    seqs = [seq([i + 1], max_tokens=5) for i in range(32)]
    for s in seqs:
        s.sink = QueueSink()
    threads = [threading.Thread(target=loop.submit, args=(s,)) for s in seqs]
    [t.start() for t in threads]
    [t.join() for t in threads]
    try:
        assert all(len(s.sink.wait(10).ids) == 5 for s in seqs)
    finally:
        loop.stop()


class CountingSink(QueueSink):
    def __init__(self):
        super().__init__()
        self.responses = 0

    def send(self, seq, ids, n_context, final):
        self.responses += 1
        super().send(seq, ids, n_context, final)


@pytest.mark.parametrize("budget, most", [(0.0, None), (20.0, True)])
def test_response_budget_merges_tokens_into_fewer_responses(budget, most):
    """max_responses_per_s: with 2 streams and 20 responses/s each stream answers at most every
    100 ms, so 40 fast tokens arrive in a few responses, all ids intact; 0 = every token."""
    cfg = EngineConfig(max_slots=2, max_tokens_limit=100, max_responses_per_s=budget)
    seqs = [seq([1], max_tokens=40, stream=True), seq([3], max_tokens=40, stream=True)]
    loop = EngineLoop(CountingRuntime(slots=2, delay=0.002), cfg).start()
    t0 = time.monotonic()
    try:
        for s in seqs:
            s.sink = CountingSink()
            loop.submit(s)
        results = [s.sink.wait(10) for s in seqs]
    finally:
        loop.stop()
    elapsed = time.monotonic() - t0
    assert results[0].ids == [i % 49 + 1 for i in range(1, 41)] and len(results[1].ids) == 40
    counts = [s.sink.responses for s in seqs]
    if most:  # the first token at once, then at most one response per 100 ms, then the final one
        assert all(c <= 2 + int(elapsed / 0.1) for c in counts) and (elapsed > 3.5 or all(c < 40 for c in counts))
    else:
        assert all(c == 40 for c in counts)


def test_prefill_gather_holds_newcomers_while_others_decode():
    cfg = EngineConfig(max_slots=4, max_context=64, max_tokens_limit=32, default_max_tokens=16, prefill_gather_ms=80.0)
    sched = Scheduler(cfg)
    first = seq([1, 2, 3], max_tokens=8)
    sched.add(first)
    plan = sched.schedule()
    assert plan.prefill == [first]  # nothing decoding: starts at once
    run_step(sched, plan)
    late = seq([4, 5], max_tokens=8)
    sched.add(late)
    plan = sched.schedule()
    assert plan.prefill == [] and plan.decode == [first]  # waits to gather company
    late.arrival -= 0.025  # one of four slots decoding: waits 80 ms x 1/4 at most
    plan = sched.schedule()
    assert plan.prefill == [late]
    run_step(sched, plan)
    a, b = seq([6], max_tokens=8), seq([7], max_tokens=8)
    sched.add(a)
    assert sched.schedule().prefill == []
    sched.add(b)  # enough to fill both free slots: no reason to wait
    assert sched.schedule().prefill == [a, b]
    assert [s.slot for s in (first, late, a, b)] == [0, 1, 2, 3]


def test_a_prompt_in_pieces_streams_like_a_whole_one_and_can_be_cancelled_mid_prefill():
    """Through the loop: a 40-token prompt goes in pieces of 16, 16 and 8 and then generates as a
    whole one would; one cancelled while its pieces run gets
    its one final response and frees its slot for the next request."""
    cfg = EngineConfig(max_slots=1, max_tokens_limit=100, max_context=1024, max_prefill_tokens=16)
    rt = ChunkedRuntime(slots=1)
    (res,), _ = run_loop(rt, cfg, [seq(range(1, 41), max_tokens=3, stream=True)])
    assert res.ids == [41, 42, 43] and res.finish_reason == "length"
    assert rt.rows[:4] == [(0, 16), (16, 16), (32, 8), (40, 1)]
    slow = ChunkedRuntime(slots=1, delay=0.02)
    loop = EngineLoop(slow, cfg).start()
    try:
        long, nxt = seq(range(1, 1001), max_tokens=3, stream=True), seq([1], max_tokens=3)
        long.sink, nxt.sink = QueueSink(), QueueSink()
        loop.submit(long)
        loop.submit(nxt)
        while len(slow.rows) < 2:
            time.sleep(0.005)
        long.sink.cancelled = True
        cancelled, after = long.sink.wait(10), nxt.sink.wait(10)
        assert cancelled.finish_reason == "cancelled" and cancelled.ids == []
        assert max(start for start, n in slow.rows if n > 1) < 1000 - 16  # ended before its last piece
        assert after.ids == [2, 3, 4] and loop.scheduler.free_slots == [0]
    finally:
        loop.stop()


def test_wait_for_capacity_holds_a_caller_while_every_slot_is_claimed():
    """What a full engine instance does in execute() when Triton runs several: it waits (so Triton
    routes new requests to the other instances) until a sequence finishes, or gives up after the
    timeout and queues the request anyway."""
    cfg = EngineConfig(max_slots=1, max_context=1024, max_tokens_limit=100, default_max_tokens=16)
    loop = EngineLoop(CountingRuntime(slots=1, delay=0.01), cfg).start()
    try:
        assert loop.wait_for_capacity(0.01)  # idle: at once
        first = seq([1, 2, 3], max_tokens=20, ignore_eos=True)
        first.sink = QueueSink()
        loop.submit(first)
        t0 = time.monotonic()
        assert not loop.wait_for_capacity(0.05)  # its slot is claimed: the caller waited the full timeout
        assert time.monotonic() - t0 >= 0.05
        assert loop.wait_for_capacity(10.0)  # released when `first` finishes
        assert first.sink.wait(10).finish_reason == "length"
    finally:
        loop.stop()


def test_a_large_batch_alternates_admissions_with_multi_step_runs():
    """With enough sequences decoding, a launch that admitted prompts is followed by a run of decode
    steps although requests wait (they go in at the launch after it), so arrivals at every step do
    not keep every launch single."""
    cfg = EngineConfig(max_slots=4, max_context=64, max_tokens_limit=60, default_max_tokens=16, multi_step_min_active=2)
    sch = Scheduler(cfg, max_steps=4)
    a, b, c, d = (seq([1] * 10, max_tokens=40) for _ in range(4))
    sch.add(a)
    sch.add(b)
    admit = sch.schedule()
    assert admit.prefill == [a, b] and admit.steps == 1
    sch.launched(admit)
    sch.add(c)  # arrives while a run is due
    run = sch.schedule()
    assert run.prefill == [] and run.decode == [a, b] and run.steps == 4 and list(sch.waiting) == [c]
    sch.launched(run)
    admit = sch.schedule()
    assert admit.prefill == [c] and admit.steps == 1
    sch.launched(admit)
    sch.add(d)
    assert sch.schedule().steps == 4 and list(sch.waiting) == [d]
    few = Scheduler(replace(cfg, multi_step_min_active=3), max_steps=4)  # too few decoding: admit at once
    for s in (seq([1] * 10), seq([1] * 10)):
        few.add(s)
    few.launched(few.schedule())
    few.add(seq([1] * 10))
    assert len(few.schedule().prefill) == 1


def test_logprobs_follow_the_kept_tokens_and_keep_multi_step_off():
    """A sequence that asks for log-probabilities gets one per kept id (EOS is not kept), and
    decodes one step per launch even where the others could run several."""
    cfg = EngineConfig(max_slots=2, max_context=64, max_tokens_limit=60, default_max_tokens=16, multi_step_min_active=1)
    sch = Scheduler(cfg, max_steps=4)
    lp, plain = seq([1, 2], max_tokens=10, logprobs=True, top_logprobs=1), seq([1, 2], max_tokens=10)
    sch.add(lp)
    sch.add(plain)
    plan = sch.schedule()
    sch.launched(plan)
    sch.update_from_output(plan, [Sampled(5, -0.5, [5], [-0.5]), 6])
    nxt = sch.schedule()
    assert nxt.steps == 1 and nxt.decode == [lp, plain]
    sch.launched(nxt)
    assert sch.update_from_output(nxt, [Sampled(EOS, -0.1, [EOS], [-0.1]), 6]) == [lp]
    assert lp.output_ids == [5] and lp.logprobs == [-0.5] and lp.top_logprobs == [([5], [-0.5])]
    assert lp.finish_reason == "stop" and plain.output_ids == [6, 6]
    assert sch.schedule().steps == 4  # without it, the others run in multi-step again
