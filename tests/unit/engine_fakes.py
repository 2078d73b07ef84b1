"""Fabricated runtimes, KV budgets and helpers that feed the scheduler and engine loop in the
unit tests: no model involved."""

import time
from dataclasses import replace

import numpy as np

from tritonllm.config import SamplingParams
from tritonllm.engine.inprocess import QueueSink
from tritonllm.engine.loop import EngineLoop
from tritonllm.engine.sampling import new_rng, sample
from tritonllm.engine.scheduler import Scheduler
from tritonllm.engine.sequence import Sequence, StepPlan
from tritonllm.model.shape import ModelShape
from tritonllm.runtimes.base import Runtime as RuntimeContract
from tritonllm.runtimes.base import RuntimeCapabilities, StepInput

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


def run_step(sched: Scheduler, plan: StepPlan, token: int = 5) -> None:
    """What the engine loop does with a plan: launch it, then hand back one token per row."""
    sched.launched(plan)
    sched.update_from_output(plan, [token] * len(plan.sequences))


class ChunkedRuntime(CountingRuntime):
    """Takes prompt pieces (as ONNX Runtime does); records each row's (start, length)."""

    capabilities = RuntimeCapabilities(prompt_pieces=True)

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.rows: list[tuple[int, int]] = []

    def step(self, inputs):
        self.rows += [(x.start, len(x.tokens)) for x in inputs]
        return super().step(inputs)


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
