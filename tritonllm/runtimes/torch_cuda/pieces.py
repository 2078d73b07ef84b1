"""Steps of prompt pieces (rows that start after a cached part of their prompt: prefix-cache hits,
chunked prefill) on the fused kernels, every token a row, and their CUDA graphs.

Launched eagerly, such a step costs the host about 150 kernel launches and their Python, several
ms, which a burst of cached prompts waits on for its first tokens while the device has less work
than that. A graph per (tokens, pieces) bucket replays the step in one call: its inputs are laid
flat and padded to the bucket (`PieceLayout`); padding tokens are a piece of their own at position 0
of the scratch slot, padding pieces take row 0's logits, padding tiles hold no rows.
The step's tokens pad to 1.5x steps (padding is computed), its pieces to powers of 4 (a padding
piece costs one row of the LM head)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..base import StepInput
from ..kernels.attention import PieceTiles
from .graphs import PREFILL_GRAPH_TOKENS, GraphCache, bucket_for
from .transfers import PinnedRing, copy_to

SMALLEST_STEP = 32  # tokens of the smallest graphed step


def token_buckets(most: int, smallest: int = SMALLEST_STEP) -> list[int]:
    """smallest, 1.5x, 2x, 3x, 4x ... up to `most` (which is last)."""
    out, b = [], smallest
    while b < most:
        out += [b] + ([3 * b // 2] if 3 * b // 2 < most else [])
        b *= 2
    return out + [most]


@dataclass(frozen=True)
class PieceBuckets:
    """The (tokens, pieces) buckets a step of pieces replays a graph for; None beyond the largest."""

    tokens: list[int]
    pieces: list[int]

    @classmethod
    def for_engine(cls, most_tokens: int, max_slots: int) -> PieceBuckets:
        most = min(most_tokens, PREFILL_GRAPH_TOKENS)
        pieces = [4**i for i in range(12) if 4**i < max_slots] + [max_slots]
        return cls(token_buckets(max(most, 2)), pieces)

    def pieces_for(self, tokens: int) -> list[int]:
        """The piece buckets of a token bucket: a piece holds two tokens at least."""
        cap = bucket_for(min(max(1, tokens // 2), self.pieces[-1]), self.pieces)
        return [b for b in self.pieces if b <= cap]

    def all(self) -> list[tuple[int, int]]:
        return [(t, b) for t in self.tokens for b in self.pieces_for(t)]

    def of(self, tokens: int, pieces: int) -> tuple[int, int] | None:
        if tokens > self.tokens[-1] or pieces > self.pieces[-1]:
            return None
        t, b = bucket_for(tokens, self.tokens), bucket_for(pieces, self.pieces)
        return (t, b) if b in self.pieces_for(t) else None


def max_tiles(tokens: int, pieces: int, per: int) -> int:
    """The most attention tiles `pieces` pieces of `tokens` tokens in all make, `per` rows a tile,
    with their padding as one piece more."""
    return -(-tokens // per) + pieces + 1


@dataclass(frozen=True)
class PieceLayout:
    """A step of pieces as host lists: each token's id, slot and position, the row of each piece's
    last token, and the attention tiles (first row, rows), padded where sizes are given."""

    ids: list[int]
    slots: list[int]
    positions: list[int]
    last: list[int]
    first: list[int]
    count: list[int]

    @classmethod
    def of(cls, rows: list[StepInput], per: int, pad: tuple[int, int, int] | None = None,
           pad_slot: int = 0) -> PieceLayout:  # fmt: skip
        """`per` rows a tile; `pad`: (tokens, pieces, tiles) to pad to, the padding tokens a piece
        of their own in `pad_slot` at position 0, in tiles like the rest (their attention then reads
        only what they wrote: no stale rows)."""
        lengths = [len(r.tokens) for r in rows]
        ids = [t for r in rows for t in r.tokens]
        slots = [r.slot for r in rows for _ in r.tokens]
        positions = [r.start + i for r in rows for i in range(len(r.tokens))]
        last = [n - 1 for n in itertools.accumulate(lengths)]
        if pad is None:
            return cls(ids, slots, positions, last, *PieceTiles.lists(lengths, per))
        tokens, pieces, tiles = pad
        more = tokens - len(ids)
        first, count = PieceTiles.lists(lengths + [max(more, 0)], per)
        if more < 0 or len(rows) > pieces or len(first) > tiles:
            raise ValueError(f"{len(ids)} tokens in {len(rows)} pieces, {len(first)} tiles, padded to {pad}")
        fewer = tiles - len(first)
        return cls(
            ids + [0] * more,
            slots + [pad_slot] * more,
            positions + [0] * more,
            last + [0] * (pieces - len(rows)),
            first + [0] * fewer,
            count + [0] * fewer,
        )


class PieceGraphs:
    """Graphs of steps of pieces, one per bucket, each writing its logits into `logits` (one buffer
    for every graph). A bucket's inputs sit at the start of one static device buffer, laid out
    [ids | slots | positions | last | tile first | tile count], so a step uploads them in one copy.
    `run(ids, slots, positions, last, tiles)` is the eager step the graphs capture."""

    def __init__(self, buckets: PieceBuckets, run: Callable, per: Callable[[int], int], logits: torch.Tensor,
                 scratch_slot: int, graphs: GraphCache):  # fmt: skip
        self.buckets, self._run, self.per, self.logits = buckets, run, per, logits
        self.scratch_slot, self.graphs = scratch_slot, graphs
        self.numel = max(self._sizes(t, b)[-1] for t, b in buckets.all())  # the largest bucket's inputs
        self._static = torch.zeros(self.numel, dtype=torch.long, device=logits.device)

    def _sizes(self, tokens: int, pieces: int) -> list[int]:
        """Where each input of the bucket ends in the static buffer."""
        tiles = max_tiles(tokens, pieces, self.per(tokens))
        return list(itertools.accumulate([tokens, tokens, tokens, pieces, tiles, tiles]))

    def _inputs(self, tokens: int, pieces: int) -> tuple:
        ends = self._sizes(tokens, pieces)
        ids, slots, positions, last, first, count = (self._static[a:b] for a, b in zip([0, *ends], ends))
        return ids, slots, positions, last, PieceTiles(first, count, self.per(tokens))

    def graph(self, tokens: int, pieces: int) -> tuple:
        """(graph, logits) of the bucket, captured on first use."""

        def body():
            return self.logits[:pieces].copy_(self._run(*self._inputs(tokens, pieces)))

        key = ("pieces", tokens, pieces)
        return self.graphs.get(key, lambda: self.graphs.capture(body, f"pieces tokens={tokens} pieces={pieces}"))

    def capture(self, bucket: tuple[int, int], ring: PinnedRing | None = None) -> None:
        """Capture the bucket's graph now (start-up) on inputs of padding alone: the buckets share
        the static buffer, so what another bucket left there may point past a table or a row."""
        self.fill([], bucket, ring)
        self.graph(*bucket)

    def fill(self, rows: list[StepInput], bucket: tuple[int, int], ring: PinnedRing | None) -> None:
        """The static inputs of `bucket`'s graph for these pieces, padded, in one copy."""
        tokens, pieces = bucket
        per = self.per(tokens)
        lay = PieceLayout.of(rows, per, (tokens, pieces, max_tiles(tokens, pieces, per)), self.scratch_slot)
        values = [*lay.ids, *lay.slots, *lay.positions, *lay.last, *lay.first, *lay.count]
        copy_to(self._static[: len(values)], values, ring)

    def replay(self, rows: list[StepInput], bucket: tuple[int, int], ring: PinnedRing | None) -> torch.Tensor:
        """Logits [len(rows), V] of the pieces, from the bucket's graph."""
        self.fill(rows, bucket, ring)  # first: a graph captured now runs the step on these inputs
        graph, out = self.graph(*bucket)
        graph.replay()
        return out[: len(rows)]

    def eager(self, rows: list[StepInput], bucket: tuple[int, int]) -> torch.Tensor:
        """What the bucket's graph computes, launched eagerly (a device without graphs; tests)."""
        self.fill(rows, bucket, None)
        return self._run(*self._inputs(*bucket))[: len(rows)]


def piece_warm_ups(
    group: int, kv_heads: int, most_tokens: int, max_context: int, query_rows: int = 64
) -> list[tuple[list[int], int]]:
    """Steps of prompt pieces (the token count of each piece, and where they all start) that between
    them meet every kernel variant a step of up to `most_tokens` can: the attention tile's height
    (`PieceTiles.rows_for`, by the step's tokens) and OpenAI Triton's integer specialisation (a
    multiple of 16 or not) of the step's tokens and of its span (the attention's key limit: start
    + the longest piece) each compile on first use, a stall of hundreds of ms if met under load.
    Each step runs twice, its span once a multiple of 16 and once not; pieces start at 16-32 and
    end before `max_context` (none where it is too short for a piece of 2)."""
    longest, steps, seen = max_context - 33, [], set()
    if longest < 2:
        return []
    totals = [t for n in [2] + [16 << i for i in range(24)] for t in (n, n + 1) if t <= most_tokens]
    for total in totals:
        key = (PieceTiles.rows_for(group, total, kv_heads, query_rows), total % 16 == 0)
        if key not in seen:
            seen.add(key)
            lengths = [min(longest, total - at) for at in range(0, total, longest)]
            start = 16 + (-(16 + lengths[0])) % 16  # start + the longest piece: a multiple of 16
            steps += [(lengths, start), (lengths, start + 1)]
    return steps
