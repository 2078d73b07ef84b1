"""A request inside the engine (`Sequence`: its prompt, sampling parameters, generated ids, slot
and progress) and one step's plan (`StepPlan`). Triton-free."""

from __future__ import annotations

import functools
import itertools
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import SamplingParams
from ..runtimes.base import StepInput

_ids = itertools.count(os.getpid() << 32)  # unique across the processes that share an engine process
NO_TOKENS: tuple[int, ...] = ()  # a decode row whose token is on the device: shared, nothing to allocate or free
_step_input = functools.partial(tuple.__new__, StepInput)  # a StepInput without the named tuple's Python __new__


@dataclass(eq=False, slots=True)
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    stop_token_ids: frozenset[int]
    rng: np.random.Generator | None  # the request's draws; None for greedy ones (never drawn from)
    echo_prompt: bool = False  # exclude_input_in_output=False: the prompt is part of the output
    sink: Any = None  # where the engine loop sends this sequence's responses (a ResponseSink)
    deadline: float = float("inf")
    uid: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    slot: int | None = None
    finish_reason: str | None = None
    emitted: int = 0  # visible ids already sent
    last_emit: float = 0.0
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    pending: int = 0  # tokens sampled by launched steps, not yet appended here
    cancel_requested: bool = False  # set by the engine's cancellation watcher
    prefilled: int = 0  # prompt tokens in the KV cache (or on their way: launched)
    reused_tokens: int = 0  # ... of which the runtime's prefix cache held (not computed again)
    chunk: int = 0  # prompt tokens the scheduled step prefills
    kv_room: int = 0  # positions the KV cache has promised this sequence (its blocks, held or owed)
    preemptions: int = 0  # times its blocks were taken back to be recomputed (kv_policy max-utilization)
    device_rng: Any = None  # a device runtime's random generator for this sequence, made on first draw
    logprobs: list[float] = field(default_factory=list)  # per output id, where params.logprobs
    top_logprobs: list[tuple[list[int], list[float]]] = field(default_factory=list)  # (ids, log-probs) per output id
    # fixed at creation (read for every sequence at every step):
    n_prompt: int = field(init=False)
    n_prefill: int = field(init=False)  # tokens to put in the cache before decoding: the prompt, and after a
    # preemption the prompt and the ids generated before it (recomputed, not generated again)
    needs_host_history: bool = field(init=False)  # sampling reads the generated ids (repetition penalty,
    # bad words): a step for this sequence cannot be launched before the previous step's token is on the host
    greedy: bool = field(init=False)
    eos_masked_below: float = field(init=False)  # the EOS ids are masked while fewer tokens were generated
    # (min_tokens; inf with ignore_eos; 0 without EOS ids)
    eos_always_masked: bool = field(init=False)  # ignore_eos with EOS ids: the sampler's one-test row
    longest_stop: int = field(init=False)  # ids in the longest stop sequence (a response resends twice that)
    ends_on: frozenset[int] = field(init=False)  # ids that end it when sampled (none with ignore_eos)
    plain_append: bool = field(init=False)  # a sampled id is only appended and length-checked (no
    # log-probabilities, stop sequences or stop strings): the scheduler's per-row fast path
    plain_sampling: bool = field(init=False)  # greedy, no history processors, no log-probabilities
    output_limit: int = field(init=False)  # output ids at which it ends for length: max_tokens, lowered to
    # what max_context leaves after the prompt once a scheduler admits it (`limit_output`); read per row per step

    def __post_init__(self) -> None:
        p = self.params
        self.n_prompt = self.n_prefill = len(self.prompt_ids)
        self.needs_host_history = p.repetition_penalty != 1.0 or bool(p.bad_ids) or p.has_output_penalties
        self.greedy = p.greedy
        self.eos_masked_below = 0 if not self.stop_token_ids else float("inf") if p.ignore_eos else p.min_tokens
        self.eos_always_masked = self.eos_masked_below == float("inf")
        self.longest_stop = max(map(len, p.stop_ids), default=0)
        self.ends_on = frozenset() if p.ignore_eos else self.stop_token_ids
        self.plain_append = not (p.logprobs or p.stop_ids or p.stop_strings)
        self.plain_sampling = self.greedy and not self.needs_host_history and not p.logprobs
        self.output_limit = p.max_tokens

    def limit_output(self, max_context: int) -> None:
        """The engine's context bounds the output too: one comparison per step instead of two."""
        self.output_limit = min(self.params.max_tokens, max_context - self.n_prompt)

    @property
    def length(self) -> int:
        return self.n_prompt + len(self.output_ids)

    @property
    def generated(self) -> int:
        """Tokens generated so far, counting those still on the device (min_tokens masking)."""
        return len(self.output_ids) + self.pending

    @property
    def visible_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids if self.echo_prompt else self.output_ids

    @property
    def unsent_logprobs_start(self) -> int:
        """The index in `logprobs` of the first generated id not yet sent (the prompt comes first in
        the visible ids when it is echoed)."""
        return max(0, self.emitted - (self.n_prompt if self.echo_prompt else 0))

    def context_ids(self) -> list[int]:
        """The ids its prefill puts in the cache (`n_prefill` of them)."""
        if self.n_prefill == self.n_prompt:
            return self.prompt_ids
        return self.prompt_ids + self.output_ids[: self.n_prefill - self.n_prompt]

    def resume(self) -> None:
        """Readmitted after a preemption, with no token still on its way: its prefill recomputes the
        prompt and every id generated so far, and samples the next one."""
        self.n_prefill, self.prefilled = self.n_prompt + len(self.output_ids), 0

    def step_input(self) -> StepInput:
        if self.pending:  # a token still pending lives only on the device: the runtime reads it there
            return _step_input((self.slot, NO_TOKENS, self.n_prompt + len(self.output_ids) - 1 + self.pending))
        if self.prefilled < self.n_prefill:  # the prompt, or its next piece (chunked prefill)
            piece = self.context_ids()[self.prefilled : self.prefilled + self.chunk]
            return StepInput(self.slot, piece, self.prefilled)
        return StepInput(self.slot, self.output_ids[-1:], self.n_prompt + len(self.output_ids) - 1)


def step_inputs(seqs: list[Sequence]) -> list[StepInput]:
    """Each sequence's `step_input()`, the decode row with a token on its way (most rows, each step)
    made inline."""
    new, none = _step_input, NO_TOKENS
    return [
        new((s.slot, none, s.n_prompt + len(s.output_ids) - 1 + s.pending)) if s.pending else s.step_input()
        for s in seqs
    ]


@dataclass
class StepPlan:
    prefill: list[Sequence]
    decode: list[Sequence]
    steps: int = 1  # decode steps launched together (multi-step: no prefill, every row decodes `steps` tokens)
    partial: frozenset = frozenset()  # prefill rows whose piece does not end the prompt: no token this step

    @property
    def sequences(self) -> list[Sequence]:
        return self.prefill + self.decode

    def __bool__(self) -> bool:
        return bool(self.prefill or self.decode)
