"""The engine loop driven in-process (no Triton): for parity tests and the benchmark."""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import EngineConfig
from ..runtimes import load_runtime
from .loop import EngineLoop
from .request import DictReader, build_sequence


@dataclass
class Collected:
    ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    token_times: list[float] = field(default_factory=list)
    error: Exception | None = None
    logprobs: list[float] = field(default_factory=list)  # where asked for (return_log_probs)
    top_logprobs: list[tuple[list[int], list[float]]] = field(default_factory=list)
    reused_tokens: int = 0  # prompt tokens the prefix cache held


class QueueSink:
    """Collects one sequence's responses; `wait()` blocks until the final one."""

    def __init__(self):
        self.q: queue.Queue = queue.Queue()
        self.cancelled = False
        self.logprobs: list[float] = []
        self.top_logprobs: list = []
        self.reused_tokens = 0

    def send(self, seq, ids, n_context, final):
        if final:  # the loop appends no more: its log-probabilities are complete
            self.logprobs, self.top_logprobs = list(seq.logprobs), list(seq.top_logprobs)
            self.reused_tokens = seq.reused_tokens
        self.q.put((list(ids[n_context:]), final, seq.finish_reason, time.perf_counter()))

    def send_error(self, seq, error):
        self.q.put((error, True, "error", time.perf_counter()))

    def is_cancelled(self):
        return self.cancelled

    def wait(self, timeout_s: float = 300.0) -> Collected:
        out = Collected()
        while True:
            ids, final, reason, at = self.q.get(timeout=timeout_s)
            if isinstance(ids, Exception):
                out.error = ids
                return out
            out.ids += ids
            out.token_times += [at] * len(ids)
            if final:
                out.finish_reason = reason
                out.logprobs, out.top_logprobs = self.logprobs, self.top_logprobs
                out.reused_tokens = self.reused_tokens
                return out


class InProcessEngine:
    def __init__(self, engine_dir: Path, cfg: EngineConfig, runtime=None):
        self.cfg = cfg
        self.runtime = runtime or load_runtime(cfg, Path(engine_dir))
        self.loop = EngineLoop(self.runtime, cfg).start()

    def submit(self, prompt_ids: list[int], sink=None, **params):
        """Enqueue one request; its responses go to `sink` (a QueueSink unless given), returned."""
        seq = build_sequence(DictReader({"input_ids": prompt_ids, **params}), self.cfg, self.runtime.shape)
        seq.sink = sink or QueueSink()
        self.loop.submit(seq)
        return seq.sink

    def generate(self, prompt_ids: list[int], **params) -> Collected:
        return self.submit(prompt_ids, **params).wait()

    def close(self) -> None:
        self.loop.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
