"""Prometheus metrics of the engine, published through Triton's custom metrics API (`pb` is
triton_python_backend_utils); a small thread copies the loop's counters every half second.

Every custom-metric call is a round trip to Triton's core. A finished request's three (its reason's
count, TTFT, ITL) are made on a thread of their own: on the thread that reported the finish (the
engine loop, or the receiver of the engine process's responses) a wave of a thousand finishes
held every response behind it for the length of three thousand round trips."""

from __future__ import annotations

import collections
import queue
import threading
from typing import Protocol

from ..engine.stats import EngineSnapshot, Finished


class EngineSource(Protocol):
    """An engine loop, here or in its own process (`engine.core_process`)."""

    def snapshot(self) -> EngineSnapshot: ...


LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]


class EngineMetrics:
    def __init__(self, pb, engine: EngineSource, model: str, instance: str = "", engine_wide: bool = True):
        """Every metric is labelled with the model and the engine instance (one per GPU, or several
        CPU instances: each its own process, engine and slots). Where model instances share one
        engine process (io_processes), only the one that started it exports the engine's series
        (`engine_wide`); each exports its own requests' (finished, TTFT, ITL)."""
        fam = pb.MetricFamily
        labels = {"model": model, "instance": instance or model}
        self._families = []  # a family must outlive its metrics

        def metric(name, kind, desc, **kw):
            family = fam(name=name, description=desc, kind=kind)
            self._families.append(family)
            return family.Metric(labels=labels, **kw)

        if engine_wide:
            self._engine_series(metric, fam, labels)
        self.finished_family = fam(
            name="tritonllm_requests_finished_total", kind=fam.COUNTER, description="requests finished, by reason"
        )
        self.ttft = metric(
            "tritonllm_time_to_first_token_seconds", fam.HISTOGRAM, "time to first token", buckets=LATENCY_BUCKETS
        )
        self.itl = metric(
            "tritonllm_inter_token_latency_seconds",
            fam.HISTOGRAM,
            "mean inter-token latency per request",
            buckets=LATENCY_BUCKETS,
        )
        self.labels, self.engine = labels, engine
        self._finished: dict[str, object] = {}
        self._last: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True, name="tritonllm-metrics")
        if engine_wide:
            self.slots.set(engine.snapshot().slots)  # the runtime's count (memory may allow fewer than configured)
            self._thread.start()
        self._done: queue.SimpleQueue[Finished | None] = queue.SimpleQueue()
        self._observer = threading.Thread(target=self._observe, daemon=True, name="tritonllm-metrics-finished")
        self._observer.start()

    def _engine_series(self, metric, fam, labels) -> None:
        """The engine's own series (slots, loop, prefill, cache), polled from its snapshots."""
        self.active = metric("tritonllm_requests_active", fam.GAUGE, "sequences generating (slots in use)")
        self.queued = metric("tritonllm_requests_queued", fam.GAUGE, "requests waiting for a slot")
        self.slots = metric("tritonllm_slots_total", fam.GAUGE, "engine slots (max in-flight batch)")
        self.tokens = metric("tritonllm_tokens_generated_total", fam.COUNTER, "tokens generated")
        self.steps = metric("tritonllm_decode_steps_total", fam.COUNTER, "decode steps")
        self.batched = metric(
            "tritonllm_batched_decode_steps_total", fam.COUNTER, "decode steps shared by two or more sequences"
        )
        self.prefill_steps = metric(
            "tritonllm_prefill_steps_total",
            fam.COUNTER,
            "steps that prefilled new sequences (each stalls the running decodes)",
        )
        self.prefilled = metric("tritonllm_prefilled_sequences_total", fam.COUNTER, "sequences prefilled")
        self.loop_steps = metric("tritonllm_loop_steps_total", fam.COUNTER, "steps completed by the engine loop")
        phases = fam(
            name="tritonllm_loop_seconds_total",
            kind=fam.COUNTER,
            description="engine loop thread time by phase: launch (build and enqueue a step), wait "
            "(for its tokens: device time not hidden), complete (scheduler, responses)",
        )
        self._families.append(phases)
        self.phase = {p: phases.Metric(labels={**labels, "phase": p}) for p in ("launch", "wait", "complete")}
        self.gpu_idle = metric(
            "tritonllm_gpu_idle_seconds_total",
            fam.COUNTER,
            "device idle between steps while the loop had a step in flight (host late to launch)",
        )
        self.prefill_tokens = metric("tritonllm_prefill_tokens_total", fam.COUNTER, "prompt tokens prefilled")
        self.prefill_computed = metric(
            "tritonllm_prefill_computed_tokens_total",
            fam.COUNTER,
            "tokens computed by prefill steps, padding to batch and length buckets included",
        )
        self.prefix_queried = metric(
            "tritonllm_prefix_cache_queried_tokens_total", fam.COUNTER, "prompt tokens looked up in the prefix cache"
        )
        self.prefix_hits = metric(
            "tritonllm_prefix_cache_hit_tokens_total",
            fam.COUNTER,
            "prompt tokens found in the prefix cache (their keys/values reused, not computed)",
        )
        self.kv_waits = metric(
            "tritonllm_kv_cache_waits_total",
            fam.COUNTER,
            "engine steps at which the next request had a slot but waited for KV blocks (the pool was promised)",
        )
        self.kv_preemptions = metric(
            "tritonllm_kv_cache_preemptions_total",
            fam.COUNTER,
            "sequences whose KV blocks were taken back when the pool ran out, to be recomputed (max-utilization)",
        )
        self.kernel_compiles = metric(
            "tritonllm_kernel_compiles_total",
            fam.COUNTER,
            "kernel variants compiled after start-up (each stalled the engine loop; the log names it)",
        )
        self.kv_blocks = metric("tritonllm_kv_cache_blocks_total", fam.GAUGE, "blocks of the paged KV cache")
        self.kv_used = metric(
            "tritonllm_kv_cache_blocks_used", fam.GAUGE, "KV blocks held by sequences (not free, not evictable)"
        )

    def observe_finished(self, done: Finished) -> None:
        """Called on the thread that saw the request end: queued, published by `_observe`."""
        self._done.put(done)

    def _observe(self) -> None:
        """Publish finished requests as they come: all queued at once, each reason's count in one
        call (the histograms take one value a call)."""
        while True:
            batch = [self._done.get()]
            while not self._done.empty():
                batch.append(self._done.get())
            stop = None in batch
            reasons = collections.Counter(d.reason for d in batch if d is not None)
            for reason, n in reasons.items():
                if reason not in self._finished:
                    self._finished[reason] = self.finished_family.Metric(labels={**self.labels, "reason": reason})
                self._finished[reason].increment(n)
            for d in batch:
                if d is not None and d.ttft_s is not None:
                    self.ttft.observe(d.ttft_s)
                if d is not None and d.itl_s is not None:
                    self.itl.observe(d.itl_s)
            if stop:
                return

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            snap = self.engine.snapshot()
            st = snap.stats
            self.slots.set(snap.slots)
            self.active.set(snap.active)
            self.queued.set(snap.queued)
            self.kv_blocks.set(st.kv_blocks)
            self.kv_used.set(st.kv_blocks - st.kv_blocks_available)
            counters = [
                ("tokens", st.tokens_generated, self.tokens),
                ("steps", st.decode_steps, self.steps),
                ("batched", st.batched_decode_steps, self.batched),
                ("prefill_steps", st.prefill_steps, self.prefill_steps),
                ("prefilled", st.prefilled, self.prefilled),
                ("loop_steps", st.steps, self.loop_steps),
            ]
            counters += [(p, getattr(st, f"{p}_s"), m) for p, m in self.phase.items()]
            counters += [
                ("gpu_idle", st.gpu_idle_s, self.gpu_idle),
                ("prefill_tokens", st.prefill_tokens, self.prefill_tokens),
                ("prefill_computed", st.prefill_computed, self.prefill_computed),
                ("prefix_queried", st.prefix_queried, self.prefix_queried),
                ("prefix_hits", st.prefix_hits, self.prefix_hits),
                ("kv_waits", st.kv_waits, self.kv_waits),
                ("kv_preemptions", st.kv_preemptions, self.kv_preemptions),
                ("kernel_compiles", st.kernel_compiles, self.kernel_compiles),
            ]
            for key, value, m in counters:
                if value > self._last.get(key, 0):
                    m.increment(value - self._last.get(key, 0))
                    self._last[key] = value

    def close(self) -> None:
        self._stop.set()
        self._done.put(None)  # what is queued is published first
        for t in (self._thread, self._observer):
            if t.is_alive():
                t.join(2)
