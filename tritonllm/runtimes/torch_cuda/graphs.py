"""Shape buckets and CUDA graphs: every decode step and every prefill up to PREFILL_GRAPH_TOKENS
runs as the replay of a graph captured for its (batch, length) bucket, so the host launches one
graph instead of hundreds of kernels."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)
PREFILL_GRAPH_TOKENS = 8192  # larger prefills launch eagerly: their GPU time hides the launches, and each
# graph's memory pool grows with its size
FINE_PREFILL_BATCH = 16  # from this batch on, prefill batch buckets step by a quarter of the power of two


def buckets(limit: int, start: int = 1) -> list[int]:
    """start, 2*start, 4*start, ... below limit, then limit."""
    out, b = [], start
    while b < limit:
        out.append(b)
        b *= 2
    return out + [limit]


def bucket_for(n: int, sizes: list[int]) -> int:
    return next(b for b in sizes if b >= n)


@dataclass(frozen=True)
class Buckets:
    """Decode graphs per (batch, context) bucket; prefill graphs per (batch, prompt length) bucket.
    Prefill batches vary most, so their buckets are finer: 1.5x between the powers of two up to
    FINE_PREFILL_BATCH, quarter steps (16, 20, 24, 28, 32, 40, ...) from there, so a large prefill
    pads less than a quarter of its rows (65 prompts on the 80-prompt graph: 23 %; 25 on 28: 12 %)."""

    batch: list[int]
    context: list[int]
    prefill_batch: list[int]
    prefill_length: list[int]

    @classmethod
    def for_engine(cls, max_slots: int, max_context: int) -> Buckets:
        powers = buckets(max_slots)
        steps = {3 * p // 2 for p in powers} | {p * k // 4 for p in powers if p >= FINE_PREFILL_BATCH for k in (5, 7)}
        prefill_batch = sorted(b for b in set(powers) | steps if 1 <= b <= max_slots)
        return cls(
            powers,
            buckets(max_context, start=min(128, max_context)),
            prefill_batch,
            buckets(max_context, start=min(16, max_context)),
        )

    def prefill_graphed(self, b: int, t: int) -> bool:
        return b * t <= PREFILL_GRAPH_TOKENS

    def prefill_bucket(self, b: int, t: int) -> tuple[int, int] | None:
        """The (batch, length) graph that replays a prefill of b prompts of up to t tokens, or None
        beyond PREFILL_GRAPH_TOKENS (launched eagerly, b x t computed). A graph even where its bucket
        pads: launched eagerly, a prefill of a few thousand tokens costs the host more than its
        device time, and every decoding sequence waits for the step (docs/decisions.md)."""
        bb, tb = bucket_for(b, self.prefill_batch), bucket_for(t, self.prefill_length)
        return (bb, tb) if self.prefill_graphed(bb, tb) else None


class GraphCache:
    """Captured graphs by key; all share one memory pool (they replay one at a time on one stream)."""

    def __init__(self):
        self._graphs: dict[tuple, tuple] = {}
        self._pool = None

    def __len__(self) -> int:
        return len(self._graphs)

    def count(self, kind: str) -> int:
        return sum(1 for key in self._graphs if key[0] == kind)

    def get(self, key: tuple, make: Callable[[], tuple]) -> tuple:
        """The entry for `key`, made by `make()` (which captures through `capture`) on first use."""
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = make()
        return entry

    def capture(self, body: Callable[[], torch.Tensor], what: str) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """(graph, output) of `body`, captured after two warm-up runs on a side stream."""
        t0 = time.perf_counter()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(2):
                body()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool), torch.no_grad():
            out = body()
        self._pool = graph.pool()
        log.debug("captured %s graph in %.0f ms", what, 1e3 * (time.perf_counter() - t0))
        return graph, out
