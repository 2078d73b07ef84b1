"""The start-up warm-up of the prompt-piece path meets every kernel variant a step can (no compile
under load): each tile height and token count's specialisation, with the span (the attention's key
limit) both a multiple of 16 and not; and its pieces fit the context."""

import pytest

from tritonllm.runtimes.kernels.attention import PieceTiles
from tritonllm.runtimes.torch_cuda.pieces import piece_warm_ups
from tritonllm.runtimes.torch_cuda.tuning import piece_shapes


def variant(group: int, kv_heads: int, tokens: int, query_rows: int) -> tuple:
    return PieceTiles.rows_for(group, tokens, kv_heads, query_rows), tokens % 16 == 0


@pytest.mark.parametrize("query_rows", [32, 64, 128])
@pytest.mark.parametrize(
    "group, kv_heads, most, max_context",
    [(4, 8, 8192, 512), (4, 8, 8192, 4096), (8, 4, 1000, 256), (1, 2, 64, 64), (4, 8, 64, 40), (4, 8, 8192, 2047)],
)
def test_every_step_size_meets_a_warmed_variant(group, kv_heads, most, max_context, query_rows):
    """Whatever tile height start-up tuning chose (`query_rows`); pieces capped by the context
    (a long step in several pieces) still see both spans."""
    steps = piece_warm_ups(group, kv_heads, most, max_context, query_rows)
    warmed = {(*variant(group, kv_heads, sum(n), query_rows), (start + max(n)) % 16 == 0) for n, start in steps}
    wanted = {(*variant(group, kv_heads, t, query_rows), aligned) for t in range(2, most + 1) for aligned in (0, 1)}
    assert wanted <= warmed
    assert all(sum(n) <= most and start >= 16 and start + max(n) <= max_context for n, start in steps)
    assert len(steps) == len(warmed)  # one step per variant, no more


def test_a_context_too_short_for_a_piece_is_not_warmed():
    assert piece_warm_ups(4, 8, 8192, 34) == []
    assert max(max(n) for n, _ in piece_warm_ups(4, 8, 8192, 35)) == 2


@pytest.mark.parametrize("budget, max_context", [(8192, 2048), (512, 512), (16, 64), (8192, 40)])
def test_the_tuned_piece_steps_fit_the_budget_and_the_context(budget, max_context):
    """`piece_shapes`: what start-up times the piece tile on, within one step's tokens and the context."""
    for pieces, tokens, past in piece_shapes(budget, max_context):
        assert pieces * tokens <= budget and past >= 0 and (past + tokens < max_context or past == 0)


def test_a_piece_tile_that_differs_or_does_not_build_is_no_candidate():
    import torch

    from tritonllm.runtimes.kernels.attention_tuning import _agrees

    def out_of_resources():
        raise RuntimeError("out of resource: shared memory, Required: 262144, Hardware limit: 232448")

    ref = torch.zeros(4)
    assert _agrees(lambda: torch.full((4,), 0.01), ref, (64, 64, 4, 3))
    assert not _agrees(lambda: torch.ones(4), ref, (64, 128, 4, 3))
    assert not _agrees(out_of_resources, ref, (128, 128, 8, 2))


def test_the_runtimes_default_piece_tile_is_the_kernels_first():
    from tritonllm.runtimes.kernels.attention import PIECE_CONFIGS
    from tritonllm.runtimes.torch_cuda.tuning import PIECE_DEFAULT

    assert PIECE_DEFAULT == PIECE_CONFIGS[0]
