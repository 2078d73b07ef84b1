"""Steps of prompt pieces replayed from CUDA graphs: every step the scheduler can make finds a
bucket no smaller than itself among the graphs captured at start-up, and its inputs padded to that
bucket keep every real token's row, piece and tile while the padding joins no tile."""

import random

import pytest

from tritonllm.runtimes.base import StepInput
from tritonllm.runtimes.kernels.attention import PieceTiles
from tritonllm.runtimes.torch_cuda.pieces import PieceBuckets, PieceLayout, max_tiles, token_buckets


def test_token_buckets_step_by_half_and_end_at_the_most():
    assert token_buckets(1024) == [32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024]
    assert token_buckets(100) == [32, 48, 64, 96, 100]
    assert token_buckets(20) == [20]


@pytest.mark.parametrize("most, slots", [(8192, 256), (1024, 1024), (64, 4), (20000, 8)])
def test_every_step_of_pieces_finds_a_captured_bucket_no_smaller_than_itself(most, slots):
    buckets = PieceBuckets.for_engine(most, slots)
    captured = set(buckets.all())
    assert len(captured) == len(buckets.all())
    largest = min(most, 8192)
    for tokens in sorted({2, 3, 31, 32, 33, 47, 49, 1000, largest - 1, largest} & set(range(2, largest + 1))):
        for pieces in sorted(
            {1, 2, 3, 4, 5, 17, 64, 65, slots, tokens // 2} & set(range(1, min(slots, tokens // 2) + 1))
        ):
            t, b = buckets.of(tokens, pieces)
            assert (t, b) in captured and t >= tokens and b >= pieces, (tokens, pieces)
            assert t < 2 * tokens or t == buckets.tokens[0]  # 1.5x steps: less than double the work
    assert buckets.of(largest + 1, 1) is None and buckets.of(largest, slots + 1) is None


def test_padded_layout_keeps_every_real_row_and_leaves_padding_out_of_the_tiles():
    rng = random.Random(3)
    rows = [
        StepInput(rng.randrange(8), [rng.randrange(100) for _ in range(n)], rng.randrange(64)) for n in (23, 2, 16, 9)
    ]
    per, scratch = 4, 8
    exact = PieceLayout.of(rows, per)
    tokens, pieces, tiles = 64, 16, max_tiles(64, 16, per)
    padded = PieceLayout.of(rows, per, (tokens, pieces, tiles), scratch)
    real = len(exact.ids)
    assert (len(padded.ids), len(padded.last), len(padded.first)) == (tokens, pieces, tiles)
    for name in ("ids", "slots", "positions"):
        assert getattr(padded, name)[:real] == getattr(exact, name)
    assert padded.slots[real:] == [scratch] * (tokens - real) and padded.positions[real:] == [0] * (tokens - real)
    assert padded.last[: len(rows)] == exact.last == [22, 24, 40, 49]
    assert (padded.first[: len(exact.first)], padded.count[: len(exact.count)]) == (exact.first, exact.count)
    covered = [r for f, c in zip(padded.first, padded.count) for r in range(f, f + c)]
    assert covered == list(range(tokens))  # each token in one tile, in order, the padding in tiles after
    piece_of = [i for i, r in enumerate(rows) for _ in r.tokens] + [len(rows)] * (tokens - real)
    assert all(len({piece_of[r] for r in range(f, f + c)}) == 1 for f, c in zip(padded.first, padded.count) if c)
    assert padded.count[-1] == 0  # tiles past the last row hold none
    assert (exact.first, exact.count) == PieceTiles.lists([len(r.tokens) for r in rows], per)


def test_the_tile_bound_holds_for_any_lengths_and_padding_past_a_bucket_is_refused():
    rng = random.Random(5)
    for _ in range(200):
        per, lengths = rng.choice([1, 2, 4, 16]), [rng.randrange(2, 40) for _ in range(rng.randrange(1, 12))]
        assert len(PieceTiles.lists(lengths, per)[0]) <= max_tiles(sum(lengths), len(lengths), per)
        tokens, pieces = sum(lengths) + rng.randrange(40), len(lengths) + rng.randrange(3)
        rows = [StepInput(0, [1] * n, 16) for n in lengths]
        lay = PieceLayout.of(rows, per, (tokens, pieces, max_tiles(tokens, pieces, per)))  # fits its bound
        assert sum(lay.count) == tokens
    rows = [StepInput(0, [1] * 10, 16), StepInput(1, [2] * 10, 16)]
    with pytest.raises(ValueError, match="20 tokens in 2 pieces"):
        PieceLayout.of(rows, 4, (16, 2, 10))
    with pytest.raises(ValueError, match="padded to"):
        PieceLayout.of(rows, 4, (32, 1, 10))


class _Capturing:
    """A GraphCache that runs each body once where the real one captures it."""

    def __init__(self):
        self.keys = []

    def get(self, key, make):
        self.keys.append(key)
        return make()

    def capture(self, body, what):
        return None, body()


@pytest.mark.parametrize("most, slots, max_context", [(8192, 1024, 512), (8192, 64, 2048), (1024, 4, 128)])
def test_every_graph_captured_at_start_up_reads_inputs_inside_the_cache_and_the_step(most, slots, max_context):
    """At start-up each bucket's graph is captured on padding alone: every token in the scratch slot at
    a position inside its table, every piece's last row and every tile inside the step (the buckets
    share one buffer, where a larger bucket's slots once read as a smaller one's positions)."""
    import torch

    from tritonllm.runtimes.torch_cuda.pieces import PieceGraphs

    def run(ids, slots, positions, last, tiles):
        t = len(ids)
        assert (slots == scratch).all(), slots
        assert int(positions.max()) < max_context and int(last.max()) < t
        assert int((tiles.first + tiles.count).max()) <= t and int(tiles.count.sum()) == t
        return torch.zeros(len(last), 8)

    scratch = slots
    buckets = PieceBuckets.for_engine(most, slots)
    per = lambda tokens: PieceTiles.rows_for(4, tokens, 8)
    graphs = _Capturing()
    pieces = PieceGraphs(buckets, run, per, torch.zeros(slots, 8), slots, graphs)
    for bucket in reversed(buckets.all()):  # the largest first: its inputs are what the rest find
        pieces.capture(bucket)
    assert len(graphs.keys) == len(buckets.all())
