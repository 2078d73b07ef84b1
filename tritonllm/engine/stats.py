"""Counters of the engine loop's work, read by the metrics exporter and the benchmarks."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EngineStats:
    decode_steps: int = 0
    batched_decode_steps: int = 0  # decode steps shared by two or more sequences
    tokens_generated: int = 0
    requests_finished: dict[str, int] = field(default_factory=dict)
    prefill_steps: int = 0  # steps that prefilled one or more new sequences
    prefilled: int = 0  # sequences prefilled (over prefill_steps: how many shared a step)
    steps: int = 0  # where the loop thread's time goes (seconds, summed over steps):
    launch_s: float = 0.0  # building and enqueueing steps (host)
    wait_s: float = 0.0  # waiting for a step's tokens (the device's time not hidden)
    complete_s: float = 0.0  # scheduler update, stop checks, handing responses to sinks
    gpu_idle_s: float = 0.0  # device idle between two steps while the loop had one in flight
    # (the host was late to launch: overhead not hidden), where measured
    prefill_tokens: int = 0  # prompt tokens prefilled ...
    prefill_computed: int = 0  # ... and tokens computed for them, padding included, where reported
    prefix_queried: int = 0  # prompt tokens looked up in the runtime's prefix cache ...
    prefix_hits: int = 0  # ... and found there (not computed again), where the runtime has one
    kv_waits: int = 0  # steps at which the next request had a slot but not its KV blocks (it waited)
    kv_preemptions: int = 0  # sequences whose blocks were taken back, to be recomputed (kv_policy max-utilization)
    kv_blocks: int = 0  # a paged runtime's KV blocks ...
    kv_blocks_available: int = 0  # ... held by no sequence
    kernel_compiles: int = 0  # kernel variants the runtime compiled after start-up (each a stall), where watched


@dataclass(frozen=True)
class EngineSnapshot:
    """What the metrics exporter reads of an engine, in its own thread or across processes."""

    stats: EngineStats
    active: int  # sequences generating
    queued: int  # requests waiting for a slot or KV blocks
    slots: int  # the runtime's slots (memory may allow fewer than configured)


@dataclass(frozen=True)
class Finished:
    """A finished request as the metrics see it."""

    reason: str
    ttft_s: float | None  # time to first token, None when no token came
    itl_s: float | None  # mean inter-token latency, None below two tokens
    uid: int = -1  # the sequence's (an engine process routes the record to the I/O side that sent it)

    @classmethod
    def of(cls, seq) -> Finished:
        if seq.first_token_at is None:
            return cls(seq.finish_reason or "unknown", None, None, seq.uid)
        n = len(seq.output_ids)
        itl = (seq.last_emit - seq.first_token_at) / (n - 1) if n > 1 and seq.last_emit > seq.first_token_at else None
        return cls(seq.finish_reason or "unknown", seq.first_token_at - seq.arrival, itl, seq.uid)
