"""The scheduler and engine loop fed by a fabricated runtime: in-flight joins and leaves,
queue bounds, stop conditions, cancellation and failures; no model involved."""

import threading
import time
from dataclasses import replace

import numpy as np
import pytest

from tritonllm.config import EngineConfig, SamplingParams
from tritonllm.engine.inprocess import QueueSink
from tritonllm.engine.loop import EngineLoop
from tritonllm.engine.sampling import new_rng, sample
from tritonllm.engine.scheduler import Scheduler, should_stop
from tritonllm.engine.sequence import Sequence, StepPlan
from tritonllm.model.shape import ModelShape
from tritonllm.runtimes.base import Runtime as RuntimeContract
from tritonllm.runtimes.base import RuntimeCapabilities, Sampled, StepInput

V = 50
EOS = 0


class CountingRuntime(RuntimeContract):
    """Next token = last token + 1 (mod V, skipping EOS unless asked); records batch sizes."""

    def __init__(self, slots=4, eos_after=None, fail_on=None, delay=0.0):
        self.shape = ModelShape(1, 1, 1, 1, 1, V, 1024, (EOS,), None, None)
        self.max_slots, self.max_context = slots, 1024
        self.eos_after, self.fail_on, self.delay = eos_after, fail_on, delay
        self.batches = []
        self.slots_seen = set()

    def describe(self):
        return {}

    def step(self, inputs):
        if self.delay:
            time.sleep(self.delay)
        self.batches.append(len(inputs))
        out = np.zeros((len(inputs), V), dtype=np.float32)
        for i, x in enumerate(inputs):
            self.slots_seen.add(x.slot)
            if self.fail_on is not None and x.tokens[-1] == self.fail_on:
                raise RuntimeError("boom")
            nxt = x.tokens[-1] % (V - 1) + 1
            if self.eos_after is not None and x.start + len(x.tokens) >= self.eos_after:
                nxt = EOS
            out[i, nxt] = 10.0
        return out


class OverlappingRuntime(CountingRuntime):
    """The same tokens through `launch`/`collect`: the loop launches step N+1 before it reads step
    N's tokens, so decode inputs arrive without their last token (tokens=[]), which this runtime
    keeps per slot as a GPU runtime keeps it on the device."""

    capabilities = RuntimeCapabilities(overlap=True)
    launch_ahead = 1

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.device_tokens: dict[int, int] = {}
        self.device_token_steps = 0
        self.in_flight = self.max_in_flight = 0

    def launch(self, inputs, seqs, steps=1):
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.device_token_steps += any(not x.tokens for x in inputs)
        runs = []
        for k in range(steps):  # a multi-step launch: each step reads the tokens the one before chose
            concrete = [
                StepInput(x.slot, x.tokens if x.tokens and not k else [self.device_tokens[x.slot]], x.start + k)
                for x in inputs
            ]
            logits = self.step(concrete)
            chosen = [
                sample(row, s.params, s.prompt_ids + s.output_ids, s.generated, s.stop_token_ids, s.rng)
                for s, row in zip(seqs, logits)
            ]
            self.device_tokens.update((x.slot, t) for x, t in zip(inputs, chosen))
            runs.append(chosen)
        return runs[0] if steps == 1 else [list(r) for r in zip(*runs)]

    def collect(self, handle):
        self.in_flight -= 1
        return handle


class TwoAheadRuntime(OverlappingRuntime):
    """Run with launch_ahead=2: two steps stay queued while the loop completes the oldest."""

    launch_ahead = 2


class MultiStepRuntime(OverlappingRuntime):
    """Run with steps_per_launch=3 from one decoding sequence on: decode steps go in runs of 3."""

    capabilities = RuntimeCapabilities(overlap=True, multi_step=True)
    steps_per_launch = 3


@pytest.fixture(
    params=[CountingRuntime, OverlappingRuntime, TwoAheadRuntime, MultiStepRuntime],
    ids=["sync", "overlapped", "ahead2", "multi-step"],
)
def Runtime(request):
    return request.param


def seq(prompt, **kw):
    return Sequence(list(prompt), SamplingParams(temperature=0.0, **kw), frozenset({EOS}), new_rng(0))


def run_loop(runtime, cfg, seqs, cancel_after=None):
    cfg = replace(
        cfg,
        launch_ahead=getattr(runtime, "launch_ahead", 1),
        steps_per_launch=getattr(runtime, "steps_per_launch", 1),
        multi_step_min_active=1,
    )
    loop = EngineLoop(runtime, cfg).start()
    sinks = []
    for s in seqs:
        s.sink = QueueSink()
        sinks.append(s.sink)
        loop.submit(s)
    try:
        return [sk.wait(10) for sk in sinks], loop
    finally:
        loop.stop()


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


def run_step(sched: Scheduler, plan: StepPlan, token: int = 5) -> None:
    """What the engine loop does with a plan: launch it, then hand back one token per row."""
    sched.launched(plan)
    sched.update_from_output(plan, [token] * len(plan.sequences))


def test_prefill_token_budget_spreads_newcomers_over_steps():
    """max_prefill_tokens: a step prefills waiting prompts in arrival order while their tokens fit;
    without chunking the first always goes whole (a prompt longer than the budget runs alone), the
    rest wait their turn while the admitted ones decode."""
    cfg = EngineConfig(max_slots=4, max_context=256, max_tokens_limit=32, default_max_tokens=16, max_prefill_tokens=20)
    sched = Scheduler(cfg)
    long, a, b, c = seq(list(range(1, 31)), max_tokens=8), seq([1] * 12), seq([2] * 8), seq([3] * 5)
    for s in (long, a, b, c):
        sched.add(s)
    plan = sched.schedule()
    assert plan.prefill == [long] and long.step_input() == StepInput(0, long.prompt_ids, 0)  # 30 > 20: alone
    run_step(sched, plan)
    plan = sched.schedule()
    assert plan.prefill == [a, b] and plan.decode == [long]  # 12 + 8 = 20 fit, c's 5 more would not
    run_step(sched, plan)
    plan = sched.schedule()
    assert plan.prefill == [c] and plan.decode == [long, a, b]
    with pytest.raises(ValueError, match="max_prefill_tokens"):
        EngineConfig(max_prefill_tokens=8)


def test_chunked_prefill_splits_a_long_prompt_and_samples_only_its_last_piece():
    """A runtime that takes prompt pieces, a 16-token budget: a 34-token prompt prefills 14 (after
    the 2 of the prompt before it), then 16 while the other decodes, then its last 4; a 14-token
    prompt, which fits a step, waits for the next step whole rather than being split; only the last
    piece gives a token."""
    cfg = EngineConfig(max_slots=4, max_context=256, max_tokens_limit=32, default_max_tokens=16, max_prefill_tokens=16)
    sched = Scheduler(cfg, chunked=True)
    short, long = seq([9, 9], max_tokens=8), seq(list(range(1, 35)), max_tokens=8)
    mid, tiny = seq([7] * 14, max_tokens=8), seq([8, 8], max_tokens=8)
    for s in (short, long, mid, tiny):
        sched.add(s)
    plan = sched.schedule()
    assert plan.prefill == [short, long] and plan.partial == {long}
    assert long.step_input() == StepInput(1, list(range(1, 15)), 0)
    run_step(sched, plan)
    assert short.output_ids == [5] and long.output_ids == [] and long.first_token_at is None
    plan = sched.schedule()
    assert plan.prefill == [long] and plan.decode == [short] and plan.partial == {long}  # the budget is spent
    assert long.step_input() == StepInput(1, list(range(15, 31)), 14)
    run_step(sched, plan)
    plan = sched.schedule()
    assert plan.prefill == [long] and not plan.partial  # 4 + mid's 14 > 16, but 14 fits a step: mid waits
    assert long.step_input() == StepInput(1, [31, 32, 33, 34], 30)
    run_step(sched, plan, token=6)
    assert long.output_ids == [6] and long.step_input() == StepInput(1, [6], 34)
    plan = sched.schedule()
    assert plan.prefill == [mid, tiny] and plan.decode == [short, long] and not plan.partial


class ChunkedRuntime(CountingRuntime):
    """Takes prompt pieces (as ONNX Runtime does); records each row's (start, length)."""

    capabilities = RuntimeCapabilities(prompt_pieces=True)

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.rows: list[tuple[int, int]] = []

    def step(self, inputs):
        self.rows += [(x.start, len(x.tokens)) for x in inputs]
        return super().step(inputs)


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


class TokenBudget:
    """A KV pool of `tokens` positions in blocks of one: the admission seam a paged runtime speaks."""

    def __init__(self, tokens):
        self.free, self.held, self.most_held = tokens, {}, 0

    def reserve_kv(self, slot, tokens, spare=0):
        more = tokens - self.held.get(slot, 0)
        if more > self.free - spare:
            return 0
        if more > 0:
            self.free -= more
            self.held[slot] = tokens
        self.most_held = max(self.most_held, sum(self.held.values()))
        return self.held[slot]

    def release_kv(self, slot):
        self.free += self.held.pop(slot)

    def cached_prompt_tokens(self, prompt):
        return 0

    def prefix_block_tokens(self):
        return 0


def test_sequences_wait_for_kv_blocks_with_free_slots_and_none_is_lost(Runtime):
    """Four slots but a pool of 25 positions: each sequence may fill 2 + 8, so two run at once;
    the others wait (counted) until one ends, then run; every one finishes with its own tokens."""
    cfg = EngineConfig(max_slots=4, max_tokens_limit=100)
    rt, budget = Runtime(slots=4), TokenBudget(25)
    rt.reserve_kv, rt.release_kv = budget.reserve_kv, budget.release_kv
    results, loop = run_loop(rt, cfg, [seq([5 * i + 1, 5 * i + 2], max_tokens=8) for i in range(5)])
    assert [r.ids for r in results] == [[5 * i + 3 + k for k in range(8)] for i in range(5)]
    assert budget.most_held == 20 and budget.held == {} and budget.free == 25
    assert loop.scheduler.kv_waits > 0 and len(rt.slots_seen) <= 4


def test_a_prompt_prefix_found_cached_does_not_count_against_the_prefill_budget():
    """Three 100-token prompts whose first 96 tokens the cache holds fit a 16-token budget in one
    step: only their 4 uncached tokens each are computed; uncached, the budget takes one a step."""

    class Cached(TokenBudget):
        def cached_prompt_tokens(self, prompt):
            return 96

    cfg = EngineConfig(max_slots=4, max_context=256, max_tokens_limit=64, max_prefill_tokens=16)
    for kv, per_step in ((Cached(10_000), 3), (TokenBudget(10_000), 1)):
        sch = Scheduler(cfg, chunked=True, kv=kv)
        for _ in range(3):
            sch.add(seq(list(range(1, 101)), max_tokens=4))
        plan = sch.schedule()
        assert len(plan.prefill) == per_step
        assert [s.chunk for s in plan.prefill] == ([100] * 3 if per_step == 3 else [16])


class PrefixCache(TokenBudget):
    """A prefix cache of 16-token blocks over a roomy pool: `register` makes a prompt's whole
    blocks findable, as a runtime does when it computes them."""

    def __init__(self):
        super().__init__(10_000)
        self.known: set[tuple] = set()

    def register(self, prompt):
        self.known.update(tuple(prompt[:n]) for n in range(16, len(prompt) + 1, 16))

    def cached_prompt_tokens(self, prompt):
        return max((n for n in range(16, len(prompt), 16) if tuple(prompt[:n]) in self.known), default=0)

    def prefix_block_tokens(self):
        return 16


def test_a_burst_sharing_a_new_prefix_computes_it_once():
    """Three prompts arriving together with the same 80 uncached tokens first: the first prefills
    alone, the others wait one step and then reuse its blocks; a prompt that shares fewer than
    four blocks with it does not wait."""
    shared = list(range(1, 81))
    kv = PrefixCache()
    sch = Scheduler(EngineConfig(max_slots=4, max_context=256, max_tokens_limit=64), kv=kv)
    burst = [seq(shared + [100 + i] * 8, max_tokens=4) for i in range(3)]
    other = seq(shared[:40] + [7] * 40, max_tokens=4)
    for s in (*burst, other):
        sch.add(s)
    plan = sch.schedule()
    assert plan.prefill == [burst[0]] and sch.prefix_waits == 1
    sch.launched(plan)
    kv.register(burst[0].prompt_ids)
    plan = sch.schedule()
    assert plan.prefill == [burst[1], burst[2], other]
    assert [kv.cached_prompt_tokens(s.prompt_ids) for s in plan.prefill] == [80, 80, 32]


def test_a_newcomer_waits_for_the_piece_of_a_long_shared_prompt_computed_in_its_step():
    """Chunked prefill (96-token budget): the first prompt's second piece computes tokens 96..160
    while a newcomer sharing them finds 96 cached; it waits for them instead of computing them too."""
    shared = list(range(1, 161))
    kv = PrefixCache()
    cfg = EngineConfig(max_slots=4, max_context=512, max_tokens_limit=64, max_prefill_tokens=96)
    sch = Scheduler(cfg, chunked=True, kv=kv)
    first = seq(shared + [300], max_tokens=4)
    sch.add(first)
    plan = sch.schedule()
    sch.launched(plan)
    kv.register(first.prompt_ids[: first.prefilled])  # its first piece is cached
    late = seq(shared + [400], max_tokens=4)
    sch.add(late)
    plan = sch.schedule()
    assert plan.prefill == [first] and sch.prefix_waits == 1


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_the_inline_append_of_a_plain_row_agrees_with_append(ignore_eos):
    """update_from_output's inline path for plain rows (no log-probabilities or stop words) against
    `_append` (forced for a twin): the same ids, finish reasons and kept-token count, over random
    tokens with EOS among them, across the max_tokens and context limits."""
    cfg = EngineConfig(max_slots=8, max_context=40, max_tokens_limit=39, default_max_tokens=16)
    runs = []
    for inline in (True, False):
        sch = Scheduler(cfg)
        seqs = [seq([1] * n, max_tokens=m, ignore_eos=ignore_eos) for n, m in ((3, 30), (20, 30), (30, 9), (5, 6))]
        for s in seqs:
            s.plain_append = inline
            sch.add(s)
        plan = sch.schedule()
        draws = np.random.default_rng(7).integers(0, 6, (40, len(seqs))).tolist()  # EOS (0) about 1 in 6
        for row in draws:
            live = [s for s in seqs if s.finish_reason is None]
            if not live:
                break
            sch.update_from_output(StepPlan([], live), [row[seqs.index(s)] for s in live])
        runs.append(([(s.output_ids, s.finish_reason) for s in seqs], sch.tokens_kept))
        assert plan.prefill == seqs
    assert runs[0] == runs[1]
    reasons = {r for _, r in runs[0][0]}
    assert reasons == ({"length"} if ignore_eos else {"stop", "length"})
    if ignore_eos:  # the context limit (20 + 20 = 40) came before max_tokens (30)
        assert len(runs[0][0][1][0]) == 20
