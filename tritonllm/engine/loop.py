"""The one background generation loop every runtime plugs into.

`submit()` only enqueues. The loop admits new sequences into the running batch, polls
cancellation and deadlines, launches one runtime step for the whole batch (prefills + decodes,
sampling included), then completes the oldest step in flight: reads its tokens, updates the
scheduler and streams responses through each sequence's sink. What it asks of the runtime
follows the runtime's declared `capabilities`: with `overlap` (the GPU runtime) the host's work
overlaps the device's, `launch_ahead` steps staying queued on the device while the host
completes older ones, and with `multi_step` a plan may run several decode steps on one launch.
Other runtimes complete each step before the next is scheduled."""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..config import EngineConfig
from ..runtimes.base import Runtime
from .sampling import sample
from .scheduler import Scheduler, queue_full
from .sequence import Sequence, StepPlan, step_inputs
from .stats import EngineSnapshot, EngineStats, Finished

log = logging.getLogger(__name__)
DETOKENIZE_CONTEXT = 8  # ids resent before a response's new ids, so the detokenizer can stay stateless
CANCEL_POLL_S = 0.02  # asking Triton whether a request was cancelled is an IPC call: at most this often,
# and from a watcher thread, never from the loop's
CANCEL_POLLS_PER_S = 500  # and at most this many calls a second over all live requests (each is a round
# trip through the python stub, competing with the responses)
CANCEL_POLL_MAX_S = 0.5  # a round at least this often, however long the loop's steps take


class ResponseSink(Protocol):
    def send(self, seq: Sequence, ids: list[int], n_context: int, final: bool) -> None: ...
    def send_error(self, seq: Sequence, error: Exception) -> None: ...
    def is_cancelled(self) -> bool: ...


@dataclass
class InFlight:
    """A launched step: its plan, what `collect` turns into the sampled ids (or the ids), and its
    sequences whose next step needs this step's token on the host (usually none)."""

    plan: StepPlan
    handle: object
    host_history: list[Sequence]


def response_window(seq: Sequence, final: bool) -> tuple[list[int], int] | None:
    """The ids to send now and how many of them are context already sent, or None (nothing new)."""
    visible = seq.visible_ids
    if not seq.params.stream:
        return (visible, 0) if final else None
    if len(visible) == seq.emitted and not final:
        return None
    start = seq.emitted - DETOKENIZE_CONTEXT - 2 * seq.longest_stop
    if start < 0:
        start = 0
    return visible[start:], seq.emitted - start


def cancel_poll_period(live: int, step_s: float) -> float:
    """Seconds between two polls of `live` requests' cancellation by a loop whose steps take `step_s`."""
    return max(CANCEL_POLL_S, live / CANCEL_POLLS_PER_S, min(step_s, CANCEL_POLL_MAX_S))


def watch_cancellations(stop: threading.Event, live, on_cancel, step_s=lambda: 0.0) -> None:
    """Poll each live request's sink (an IPC round trip under Triton) until `stop`, off the loop's
    thread; `live()` lists the sequences, `on_cancel(seq)` is told once per cancelled one. At most
    once per step of the loop (`step_s()`: its recent step time): a cancellation takes effect at a
    step's end anyway, and on a CPU engine each poll's IPC work takes cores from the step itself."""
    seqs: list[Sequence] = []
    while not stop.wait(cancel_poll_period(len(seqs), step_s())):
        seqs = live()
        for seq in seqs:
            try:
                if seq.sink is not None and not seq.cancel_requested and seq.sink.is_cancelled():
                    on_cancel(seq)
            except Exception:  # a request torn down meanwhile: the loop ends it on its own
                log.debug("cancellation poll failed for sequence %d", seq.uid, exc_info=True)


class EngineLoop:
    def __init__(self, runtime: Runtime, cfg: EngineConfig, on_finish=None, decode=None, after_step=None):
        self.runtime, self.cfg = runtime, cfg
        can = runtime.capabilities
        self.scheduler = Scheduler(
            cfg,
            decode,
            slots=runtime.max_slots,
            max_steps=cfg.steps_per_launch if can.multi_step else 1,
            chunked=can.prompt_pieces,
            kv=runtime,
            hold_shared=not can.prompts_in_turn,
        )
        self.stats = EngineStats()
        self.on_finish = on_finish  # callback(Finished) for metrics
        self.after_step = after_step  # called by the loop's thread after each pass (flushes batched responses)
        self._inbox: queue.SimpleQueue[Sequence] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tritonllm-engine", daemon=True)
        self._watcher = threading.Thread(target=self._watch_cancellations, name="tritonllm-cancel-watch", daemon=True)
        self._lock = threading.Lock()
        self._capacity = threading.Condition()  # notified when a sequence finishes (wait_for_capacity)
        self._overlap = can.overlap
        self._device_sampling = can.device_sampling
        self._cancels_flagged = False  # cancel() was called since the last scan (`_drop_cancelled`)
        self._next_deadline = float("inf")  # the earliest deadline of a live sequence (or earlier)
        self._step_s = 0.0  # recent time between completed steps while busy (moving average)
        self._last_complete: float | None = None  # None after an idle pass

    def start(self) -> EngineLoop:
        self._thread.start()
        self._watcher.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        if self._watcher.is_alive():
            self._watcher.join(timeout_s)
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            self._fail(seq, RuntimeError("the engine is shutting down"))
        while not self._inbox.empty():
            self._fail(self._inbox.get_nowait(), RuntimeError("the engine is shutting down"))

    def wait_for_capacity(self, timeout_s: float) -> bool:
        """Block the caller until the engine could start one more sequence now (a slot not claimed by
        a running, waiting or arriving sequence), at most `timeout_s`; True if it can. Where Triton
        runs several engine instances it hands each request to an instance whose execute() is free:
        an instance waiting here is not, so requests go to the others first."""
        deadline = time.monotonic() + timeout_s
        with self._capacity:
            while self.scheduler.active + self.scheduler.queued + self._inbox.qsize() >= self.scheduler.slots:
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    return False
                self._capacity.wait(left)
        return True

    @property
    def shape(self):
        return self.runtime.shape

    def describe(self) -> dict:
        return self.runtime.describe()

    def snapshot(self) -> EngineSnapshot:
        sch = self.scheduler
        return EngineSnapshot(self.stats, sch.active, sch.queued, sch.slots)

    def submit(self, seq: Sequence) -> None:
        """Enqueue; raises ServerBusyError when the queue is full (checked here, before accepting)."""
        with self._lock:
            arrived = self.scheduler.queued + self._inbox.qsize() + 1  # this request included
            if self.scheduler.waiting_for_slot(arrived) > self.cfg.max_queue:
                raise queue_full(self.cfg)
            seq.deadline = time.monotonic() + self.cfg.request_timeout_s
            self._inbox.put(seq)
        self._wake.set()

    # -- loop stages ---------------------------------------------------------------------------
    def _run(self) -> None:
        in_flight: collections.deque[InFlight] = collections.deque()
        ahead = self.cfg.launch_ahead if self._overlap else 0  # steps left in flight after a launch
        while not self._stop.is_set():
            self._admit()
            self._drop_cancelled()
            if in_flight and not self._may_overlap(in_flight):
                while in_flight:
                    self._complete(in_flight.popleft())
            plan = self.scheduler.schedule()
            launched = self._launch(plan) if plan else None
            if launched is not None:
                in_flight.append(launched)
            if len(in_flight) > ahead or (in_flight and launched is None):
                self._complete(in_flight.popleft())
            elif launched is None:
                self._last_complete = None  # idle: the gap until the next step is no step time
                self._wake.wait(0.05)
                self._wake.clear()
            if self.after_step is not None:
                self.after_step()

    def _may_overlap(self, in_flight) -> bool:
        """False while a launched step holds a sequence whose next step needs its token on the host."""
        return self._overlap and not any(s.finish_reason is None for step in in_flight for s in step.host_history)

    def _admit(self) -> None:
        with self._lock:
            while not self._inbox.empty():
                seq = self._inbox.get_nowait()
                self._next_deadline = min(self._next_deadline, seq.deadline)
                self.scheduler.waiting.append(seq)

    def _drop_cancelled(self) -> None:
        """End sequences the watcher found cancelled (a flag it set), and those past their deadline.
        The live sequences are scanned only when one of those can have happened (cancel() was
        called, or the earliest deadline has passed): at a thousand streams a scan every pass is a
        cost of its own."""
        now = time.monotonic()
        if not self._cancels_flagged and now <= self._next_deadline:
            return
        self._cancels_flagged = False  # before the scan: a cancel() during it flags the next pass
        earliest = float("inf")
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            if seq.cancel_requested:
                self._end(seq, "cancelled")
            elif now > seq.deadline:
                self._end(seq, "timeout")
            elif seq.deadline < earliest:
                earliest = seq.deadline
        self._next_deadline = earliest

    def _watch_cancellations(self) -> None:
        watch_cancellations(self._stop, self._live, self.cancel, lambda: self._step_s)

    def _time_step(self, now: float) -> None:
        if self._last_complete is not None:
            self._step_s += 0.2 * (now - self._last_complete - self._step_s)
        self._last_complete = now

    def _live(self) -> list[Sequence]:
        return list(self.scheduler.running) + list(self.scheduler.waiting)

    def cancel(self, seq: Sequence) -> None:
        """End `seq` at the loop's next pass (any thread)."""
        seq.cancel_requested = True
        self._cancels_flagged = True
        self._wake.set()

    def _launch(self, plan: StepPlan) -> InFlight | None:
        seqs = plan.sequences
        t0 = time.perf_counter()
        try:
            if plan.steps > 1:
                handle = self.runtime.launch(step_inputs(seqs), seqs, steps=plan.steps)
            elif self._overlap:
                handle = self.runtime.launch(step_inputs(seqs), seqs)
            else:
                handle = self._choose(self.runtime.step(step_inputs(seqs)), seqs, plan.partial)
        except Exception as exc:  # a failed step ends its sequences with an error, the loop goes on
            log.exception("engine step failed")
            for seq in seqs:
                self._fail(seq, exc)
            return None
        for seq in plan.prefill:  # the runtime matched the prompt's prefix when it took the piece
            if not seq.preemptions:  # a recomputation's hits are not the prompt's
                seq.reused_tokens = self.runtime.reused_prompt_tokens(seq.slot)
        self.scheduler.launched(plan)
        self.stats.launch_s += time.perf_counter() - t0
        return InFlight(plan, handle, [s for s in seqs if s.needs_host_history])

    def _complete(self, step: InFlight) -> None:
        live = [s for s in step.plan.sequences if s.finish_reason is None]
        t0 = time.perf_counter()
        try:
            tokens = self.runtime.collect(step.handle) if self._overlap else step.handle
        except Exception as exc:
            log.exception("engine step failed")
            for seq in live:
                self._fail(seq, exc)
            return
        t1 = time.perf_counter()
        self._count(step.plan)
        finished = set(self.scheduler.update_from_output(step.plan, tokens))
        self.stats.tokens_generated = self.scheduler.tokens_kept
        interval, now = self._response_interval(), time.monotonic()
        self._time_step(now)
        partial = step.plan.partial  # prompt pieces: nothing to send yet
        for seq in live:
            if partial and seq in partial:
                continue
            if seq in finished:
                self._emit(seq, final=True, now=now)
            elif seq.sink is not None and not (seq.emitted and now - seq.last_emit < interval):  # tested here,
                self._emit(seq, final=False, now=now)  # not in a call per row: most rows wait their interval
        self.stats.steps += step.plan.steps
        runtime = self.runtime.stats()
        self.stats.gpu_idle_s = runtime.gpu_idle_s
        self.stats.prefill_tokens, self.stats.prefill_computed = runtime.prefill_tokens, runtime.prefill_computed_tokens
        self.stats.prefix_queried, self.stats.prefix_hits = runtime.prefix_queried_tokens, runtime.prefix_hit_tokens
        self.stats.kv_blocks, self.stats.kv_blocks_available = runtime.kv_blocks, runtime.kv_blocks_available
        self.stats.kv_waits, self.stats.kv_preemptions = self.scheduler.kv_waits, self.scheduler.preemptions
        self.stats.kernel_compiles = runtime.kernel_compiles
        self.stats.wait_s += t1 - t0
        self.stats.complete_s += time.perf_counter() - t1

    def _choose(self, logits, seqs: list[Sequence], partial: frozenset) -> list:
        """The sampled id of each row (None for a prompt piece: nothing is drawn for it, so a seeded
        request gets the same ids however its prompt was split)."""
        if partial:
            keep = [i for i, s in enumerate(seqs) if s not in partial]
            chosen: list = [None] * len(seqs)
            for i, tok in zip(keep, self._choose(logits[keep], [seqs[i] for i in keep], frozenset()) if keep else []):
                chosen[i] = tok
            return chosen
        if self._device_sampling:
            return self.runtime.sample(logits, seqs)
        return [self._sample(s, row) for s, row in zip(seqs, logits)]

    def _sample(self, seq: Sequence, row: np.ndarray) -> int:
        history = seq.prompt_ids + seq.output_ids
        return sample(row, seq.params, history, len(seq.output_ids), seq.stop_token_ids, seq.rng)

    def _count(self, plan: StepPlan) -> None:
        if plan.prefill:
            self.stats.prefill_steps += 1
            self.stats.prefilled += len(plan.prefill) - len(plan.partial)
        if plan.decode:
            self.stats.decode_steps += plan.steps
            self.stats.batched_decode_steps += plan.steps * (len(plan.decode) > 1)

    # -- responses -----------------------------------------------------------------------------
    def _emit(self, seq: Sequence, final: bool, now: float | None = None) -> None:
        """Send what is new (the caller has decided a response is due: `_complete` keeps each stream
        to its response interval). A final response is sent after the request is reported
        finished (`on_finish`): its record is on its way to the metrics before the client sees the end."""
        now = time.monotonic() if now is None else now
        if final:
            seq.last_emit = now
            self._finished(seq)
        if seq.sink is None:
            return
        window = response_window(seq, final)
        if window is None:
            return
        try:
            seq.sink.send(seq, window[0], window[1], final)
        except Exception:  # the client went away: nothing more to send to it
            log.warning("sending a response for sequence %d failed", seq.uid, exc_info=True)
            if not final:
                self._end(seq, "cancelled", notify=False)
        seq.emitted = len(seq.visible_ids)
        seq.last_emit = now

    def _response_interval(self) -> float:
        """Seconds a stream waits between responses: the fixed `stream_interval_ms` under load, and
        the adaptive one that keeps all streams together within `max_responses_per_s` (each
        response costs the server a fixed amount of work, whatever number of tokens it carries)."""
        active = self.scheduler.active
        fixed = self.cfg.stream_interval_ms / 1000.0 if active >= self.cfg.stream_coalesce_min_active else 0.0
        budget = self.cfg.max_responses_per_s
        return max(fixed, active / budget if budget else 0.0)

    def _end(self, seq: Sequence, reason: str, notify: bool = True) -> None:
        self.scheduler.finish(seq, reason)
        if notify:
            self._emit(seq, final=True)  # counts it finished, then sends
        else:
            self._finished(seq)

    def _fail(self, seq: Sequence, exc: Exception) -> None:
        self.scheduler.finish(seq, "error")
        if seq.sink is not None:
            try:
                seq.sink.send_error(seq, exc)
            except Exception:
                log.warning("could not send the error for sequence %d", seq.uid, exc_info=True)
        self._finished(seq)

    def _finished(self, seq: Sequence) -> None:
        r = seq.finish_reason or "unknown"
        self.stats.requests_finished[r] = self.stats.requests_finished.get(r, 0) + 1
        if self.on_finish is not None:
            self.on_finish(Finished.of(seq))
        with self._capacity:
            self._capacity.notify_all()
