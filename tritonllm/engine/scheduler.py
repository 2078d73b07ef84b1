"""In-flight batching scheduler (Triton-free): `schedule()` -> the runtime executes ->
`update_from_output()`. Sequences waiting for a slot join the running batch at the next step;
finished or cancelled ones leave it and free their slot."""

from __future__ import annotations

import collections
import heapq
import time
from typing import Protocol

from ..config import EngineConfig
from ..errors import ServerBusyError
from .sequence import Sequence, StepPlan


def should_stop(seq: Sequence, max_context: int, decode=None) -> str | None:
    """The finish reason after the last appended token (stop words, length), or None to go on.
    Stop words match as token ids and, where `decode` is given, as text in the recent output."""
    p = seq.params
    n = len(seq.output_ids)
    if (p.stop_ids or p.stop_strings) and n >= p.min_tokens:
        for stop in p.stop_ids:
            if stop and len(stop) <= n and seq.output_ids[-len(stop) :] == stop:
                return "stop"
        if p.stop_strings and decode is not None:
            tail = decode(seq.output_ids[-(4 * max(map(len, p.stop_strings)) + 4) :])
            if any(s in tail for s in p.stop_strings):
                return "stop"
    if n >= p.max_tokens or seq.n_prompt + n >= max_context:
        return "length"
    return None


def queue_full(cfg: EngineConfig) -> ServerBusyError:
    return ServerBusyError(
        f"the engine queue is full ({cfg.max_queue} waiting, {cfg.max_slots} generating): "
        "retry later, or raise max_queue/max_slots when building the repository"
    )


class KVAdmission(Protocol):
    """What admission asks of the KV cache (a runtime): a promise of a sequence's blocks (the positions
    promised, 0: not now), and their return."""

    def reserve_kv(self, slot: int, tokens: int, spare: int = 0) -> int: ...
    def release_kv(self, slot: int) -> None: ...
    def cached_prompt_tokens(self, prompt: list[int]) -> int: ...
    def prefix_block_tokens(self) -> int: ...


class SlotsOnly:
    """Every slot holds max_context positions of its own: a free slot is all a sequence needs."""

    def reserve_kv(self, slot: int, tokens: int, spare: int = 0) -> int:
        return 1 << 30  # every position a sequence can reach

    def release_kv(self, slot: int) -> None:
        pass

    def cached_prompt_tokens(self, prompt: list[int]) -> int:
        return 0

    def prefix_block_tokens(self) -> int:
        return 0


SHARED_BLOCKS = 4  # a newcomer waits for a prefill of the same next 4 blocks (64 tokens) to be cached


class Scheduler:
    def __init__(
        self,
        cfg: EngineConfig,
        decode=None,
        slots: int | None = None,
        max_steps: int = 1,
        chunked: bool = False,
        kv: KVAdmission | None = None,
        hold_shared: bool = True,
    ):
        """max_steps: decode steps the runtime can run in one launch (cfg.steps_per_launch where it can);
        chunked: the runtime takes a prompt in pieces at any start (prompts longer than the step's
        prefill budget are split over steps); kv: the cache that admits a sequence by the blocks it
        may fill (a paged runtime), else slots alone; hold_shared: a prompt whose first uncached blocks
        another prompt of the same step computes waits a step (the runtime batches a step's prompts)."""
        self.cfg, self.decode, self.max_steps, self.chunked = cfg, decode, max_steps, chunked
        self.hold_shared = hold_shared
        self.kv = kv or SlotsOnly()
        self.preempting = cfg.kv_policy == "max-utilization"
        self.preemptions = 0  # sequences whose blocks were taken back to be recomputed later
        self.kv_waits = 0  # steps at which the next waiting sequence had a slot but not its KV blocks
        self.prefix_waits = 0  # steps at which the next waiting sequence waited for a prefix computed in that step
        self._kv_short = False  # ... and no sequence has ended since
        self._admitted_last = False  # the last plan prefilled: a multi-step run is due (`_run_due`)
        self.tokens_kept = 0  # tokens appended to outputs (not EOS, none past a stop)
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.slots = slots or cfg.max_slots  # the runtime's, which may be fewer than cfg.max_slots
        self.free_slots = list(range(self.slots))  # a min-heap: the lowest free slot is taken first

    def add(self, seq: Sequence) -> None:
        if self.waiting_for_slot(len(self.waiting) + 1) > self.cfg.max_queue:
            raise queue_full(self.cfg)
        self.waiting.append(seq)

    def waiting_for_slot(self, arrived: int) -> int:
        """Of `arrived` requests not yet admitted, those no free slot will take at the next step:
        what `max_queue` bounds (so as many simultaneous arrivals as free slots are never refused,
        whatever max_queue is)."""
        return max(0, arrived - len(self.free_slots))

    def schedule(self) -> StepPlan:
        """Running sequences decode; waiting ones take free slots and prefill, in arrival order, up
        to `max_prefill_tokens` prompt tokens a step; a prompt that fits a step waits for the next
        one rather than being split. Where the runtime takes prompts in pieces, a longer prompt is
        split over steps (its rest goes first in the next); elsewhere the first prompt always goes
        whole. With a step still in flight (overlapped loop) a sequence its pending token surely
        ends (length) sits out. With multi-step decode at a large batch, a launch that admitted
        prompts is followed by a run of decode steps before the next admission (`_run_due`)."""
        if self.preempting:
            self._grow_or_preempt()
        decode = self._decoding()
        prefill, partial = [], []
        budget = self.cfg.max_prefill_tokens
        computing: set = set()  # where this step's prompts (and pieces) start computing (`_shared_start`)
        if self.chunked:  # a prompt split over steps goes on first
            for seq in self.running:
                if seq.prefilled < seq.n_prefill and budget > 0:
                    computing.add(self._shared_start(seq, seq.prefilled))
                    budget = self._take_piece(seq, budget, prefill, partial)
        run = self._steps_for(decode, run_due=True) if self._run_due(decode) else 1  # > 1: admit after it
        while self.waiting and self.free_slots and budget > 0 and run == 1 and self._admit_now(decode):
            head = self.waiting[0]
            if head.pending:  # preempted with a token on its way: readmitted once it has arrived
                break
            if head.preemptions:
                head.resume()
            cached = self.kv.cached_prompt_tokens(head.context_ids())  # not computed: not in the budget
            start = self._shared_start(head, cached)
            if start is not None and start in computing:
                self.prefix_waits += 1  # next step it finds those blocks cached instead of computing them again
                break
            computing.add(start)
            n = head.n_prefill - cached
            if prefill and n > budget and not (self.chunked and n > self.cfg.max_prefill_tokens):
                break
            if not self._reserve_for(head):
                self.kv_waits += 1  # it waits, first in line, until a sequence ends and frees blocks
                self._kv_short = True
                break
            seq = self.waiting.popleft()
            seq.slot = heapq.heappop(self.free_slots)
            seq.limit_output(self.cfg.max_context)
            self.running.append(seq)
            budget = self._take_piece(seq, budget, prefill, partial, cached)
        self._admitted_last = bool(prefill)
        steps = 1 if prefill else run if run > 1 else self._steps_for(decode)
        return StepPlan(prefill, decode, steps, frozenset(partial))

    def _shared_start(self, seq: Sequence, cached: int) -> tuple | None:
        """The first blocks a sequence's prefill would compute (where they start and their tokens),
        or None without a prefix cache or that many uncached blocks. A sequence whose start another
        one admitted in the same step computes waits a step, then reuses them (SGLang's in-batch
        prefix caching): a burst of requests with a new shared system prompt computes it once."""
        block = self.kv.prefix_block_tokens() if self.hold_shared else 0
        end = cached + SHARED_BLOCKS * block
        if not block or end >= seq.n_prefill:
            return None
        return cached, tuple(seq.context_ids()[cached:end])

    def _reserve_for(self, seq: Sequence) -> bool:
        """Blocks for a sequence about to take the lowest free slot: for every token it may generate
        (guaranteed-no-evict), or for its prefill and first launch, leaving a block for each running
        sequence to grow into (max-utilization: a newcomer does not take what the running need next)."""
        if self.preempting:
            tokens, spare = seq.n_prefill + self.max_steps, len(self.running)
        else:
            tokens, spare = seq.n_prompt + seq.params.max_tokens, 0
        seq.kv_room = self.kv.reserve_kv(self.free_slots[0], min(tokens, self.cfg.max_context), spare)
        return seq.kv_room > 0

    def _grow_or_preempt(self) -> None:
        """max-utilization: each decoding sequence holds the blocks its next launch writes; when the
        pool cannot promise them, the youngest running sequence gives its blocks back and waits,
        first in line, to be recomputed (itself, if it is the youngest)."""
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            need = min(seq.length + seq.pending + self.max_steps, self.cfg.max_context)
            if need <= seq.kv_room or seq.prefilled < seq.n_prefill:
                i += 1
                continue
            room = self.kv.reserve_kv(seq.slot, need)
            if room:
                seq.kv_room = room
                i += 1
            else:
                self._preempt(self.running[-1])

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's slot and blocks; it keeps its generated ids (and the token a
        launched step may still bring) and goes first in line."""
        self.running.remove(seq)
        heapq.heappush(self.free_slots, seq.slot)
        self.kv.release_kv(seq.slot)
        seq.slot, seq.chunk, seq.kv_room = None, 0, 0
        seq.preemptions += 1
        self.preemptions += 1
        self._kv_short = True
        self.waiting.appendleft(seq)

    def _take_piece(self, seq: Sequence, budget: int, prefill: list, partial: list, cached: int = 0) -> int:
        """Schedule the next piece of seq's prompt (all of it unless chunked; `cached` tokens at its
        start are the prefix cache's, beyond the budget); returns the budget left."""
        left = seq.n_prefill - seq.prefilled
        seq.chunk = min(left, budget + cached) if self.chunked else left
        prefill.append(seq)
        if seq.chunk < left:
            partial.append(seq)
        return budget - max(0, seq.chunk - cached)

    def _run_due(self, decode: list[Sequence]) -> bool:
        """Multi-step decode at a large batch (at least `multi_step_min_active` decoding): after a
        launch that admitted prompts, the next is a run of decode steps even with requests waiting;
        they go in at the launch after it. Under Triton at hundreds of streams a request arrives
        every step, and admitting first every time would keep every launch a single step."""
        return self.max_steps > 1 and self._admitted_last and len(decode) >= self.cfg.multi_step_min_active

    def _steps_for(self, decode: list[Sequence], run_due: bool = False) -> int:
        """Decode steps to launch at once: up to max_steps while at least `multi_step_min_active`
        sequences decode and nothing is left to prefill (or a run is due: `_run_due`); no sequence
        may outrun its context, change its EOS masking (min_tokens) meanwhile, or need its tokens on
        the host between steps. A sequence whose length limit or stop comes inside the run drops the
        tokens after it. Sequences that ask for log-probabilities decode one step per launch."""
        admitting = self.waiting and self.free_slots and not self._kv_short and not run_due
        if self.max_steps <= 1 or len(decode) < self.cfg.multi_step_min_active or admitting:
            return 1
        steps = self.max_steps
        for seq in decode:
            p = seq.params
            if seq.needs_host_history or p.logprobs:  # a run's tokens are plain ids
                return 1
            steps = min(steps, self.cfg.max_context - seq.length - seq.pending + 1)
            if not p.ignore_eos and seq.generated < p.min_tokens:
                steps = min(steps, p.min_tokens - seq.generated)
        return max(1, steps)

    def _admit_now(self, decode: list[Sequence]) -> bool:
        """Each prefill step stalls every decoding sequence, so with `prefill_gather_ms` newcomers
        that trickle in wait to be prefilled together: at most that long times the share of slots
        decoding (a stall costs in proportion to the sequences it holds up), or until they would
        fill every free slot; with nothing decoding they start at once."""
        gather = self.cfg.prefill_gather_ms * len(decode) / self.slots
        if gather <= 0 or len(self.waiting) >= len(self.free_slots):
            return True
        return 1e3 * (time.monotonic() - self.waiting[0].arrival) >= gather

    def _decoding(self) -> list[Sequence]:
        """The running sequences that decode this step: prefilled, and not surely ended by the tokens
        still on their way (length). One pass, inline: it runs over every running row each step."""
        return [
            s
            for s in self.running
            if s.prefilled >= s.n_prefill and not (s.pending and len(s.output_ids) + s.pending >= s.output_limit)
        ]

    def launched(self, plan: StepPlan) -> None:
        """The plan's step is enqueued: its prompt pieces are in the cache, and each of its other
        sequences has `steps` more tokens on the way."""
        for seq in plan.prefill:
            seq.prefilled += seq.chunk
        for seq in plan.sequences:
            seq.pending += plan.steps
        for seq in plan.partial:
            seq.pending -= plan.steps

    def update_from_output(self, plan: StepPlan, tokens: list) -> list[Sequence]:
        """Append each sequence's sampled token (a list of `plan.steps` tokens each for a multi-step
        plan); return those that finished (slots freed). Sequences that ended while the step was in
        flight (cancelled, or finished by an earlier step in the overlapped loop) drop their tokens."""
        finished = []
        now, steps, partial, kept = time.monotonic(), plan.steps, plan.partial, 0
        for seq, got in zip(plan.sequences, tokens):
            if partial and seq in partial:  # a prompt piece: its logits were not sampled
                continue
            seq.pending = seq.pending - steps if seq.pending > steps else 0
            if seq.finish_reason is not None:
                continue
            if seq.first_token_at is None:
                seq.first_token_at = now
            if steps == 1 and seq.plain_append:  # `_append` for the usual row, inline: EOS, append, length
                if got in seq.ends_on:
                    reason = "stop"
                else:
                    out = seq.output_ids
                    out.append(got)
                    kept += 1
                    reason = "length" if len(out) >= seq.output_limit else None
            else:
                reason = self._append(seq, got) if steps == 1 else self._append_run(seq, got)
            if reason:
                self.finish(seq, reason)
                finished.append(seq)
        self.tokens_kept += kept
        return finished

    def _append(self, seq: Sequence, tok) -> str | None:
        """One token (a `Sampled` where the sequence asks for log-probabilities): the finish reason
        it brings, or None."""
        p = seq.params
        if p.logprobs:
            tok, sampled = tok.token, tok
            if tok not in seq.stop_token_ids or p.ignore_eos:
                seq.logprobs.append(sampled.logprob)
                seq.top_logprobs.append((sampled.top_ids, sampled.top_logprobs))
        if tok in seq.stop_token_ids and not p.ignore_eos:  # EOS ends the sequence, not part of the output
            return "stop"
        seq.output_ids.append(tok)
        self.tokens_kept += 1
        return should_stop(seq, self.cfg.max_context, self.decode)

    def _append_run(self, seq: Sequence, run: list[int]) -> str | None:
        """A multi-step run of tokens, up to the first that ends the sequence. Without stop words
        or EOS in the run, the tokens within the length limit go in at once."""
        p = seq.params
        if not p.stop_ids and not p.stop_strings and (p.ignore_eos or not seq.stop_token_ids.intersection(run)):
            room = max(0, min(p.max_tokens - len(seq.output_ids), self.cfg.max_context - seq.length))
            seq.output_ids += run[:room]
            self.tokens_kept += min(room, len(run))
            return "length" if room <= len(run) else None
        for tok in run:
            reason = self._append(seq, tok)
            if reason:
                return reason
        return None

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take a sequence out (finished, cancelled, timed out or failed) and free its slot."""
        seq.finish_reason = seq.finish_reason or reason
        if seq in self.running:
            self.running.remove(seq)
            heapq.heappush(self.free_slots, seq.slot)
            self.kv.release_kv(seq.slot)
            self._kv_short = False
        elif seq in self.waiting:
            self.waiting.remove(seq)

    @property
    def active(self) -> int:
        return len(self.running)

    @property
    def queued(self) -> int:
        return len(self.waiting)
