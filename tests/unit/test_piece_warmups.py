"""The start-up warm-up of the prompt-piece path meets every kernel variant a step can (no compile
under load), and its pieces fit the context."""

import pytest

from tritonllm.runtimes.kernels.attention import PieceTiles
from tritonllm.runtimes.torch_cuda.runtime import piece_warm_ups
from tritonllm.runtimes.torch_cuda.tuning import piece_shapes


def variant(group: int, kv_heads: int, tokens: int, query_rows: int) -> tuple:
    return PieceTiles.rows_for(group, tokens, kv_heads, query_rows), tokens % 16 == 0


@pytest.mark.parametrize("query_rows", [32, 64, 128])
@pytest.mark.parametrize(
    "group, kv_heads, most, max_context",
    [(4, 8, 8192, 512), (4, 8, 8192, 4096), (8, 4, 1000, 256), (1, 2, 64, 64), (4, 8, 64, 24)],
)
def test_every_step_size_meets_a_warmed_variant(group, kv_heads, most, max_context, query_rows):
    """Whatever tile height start-up tuning chose (`query_rows`)."""
    steps = piece_warm_ups(group, kv_heads, most, max_context, query_rows)
    warmed = {variant(group, kv_heads, sum(s), query_rows) for s in steps}
    assert {variant(group, kv_heads, t, query_rows) for t in range(2, most + 1)} <= warmed
    assert all(sum(s) <= most and max(s) + 18 <= max_context for s in steps)  # from position 17: inside
    assert len(steps) == len(warmed)  # one step per variant, no more


def test_a_context_too_short_for_a_piece_is_not_warmed():
    assert piece_warm_ups(4, 8, 8192, 19) == []
    assert max(max(s) for s in piece_warm_ups(4, 8, 8192, 20)) == 2


@pytest.mark.parametrize("budget, max_context", [(8192, 2048), (512, 512), (16, 64), (8192, 40)])
def test_the_tuned_piece_steps_fit_the_budget_and_the_context(budget, max_context):
    """`piece_shapes`: what start-up times the piece tile on, within one step's tokens and the context."""
    for pieces, tokens, past in piece_shapes(budget, max_context):
        assert pieces * tokens <= budget and past >= 0 and (past + tokens < max_context or past == 0)
