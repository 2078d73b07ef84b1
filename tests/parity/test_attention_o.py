"""The decode step's attention + o product in one kernel (`attention_o`), run by Triton's
interpreter on the CPU: against `rope_attention` then o in float32 on the same paged cache (every
o tile, windows, soft caps, fp8 caches and weights, split-K products), the cache it writes, the
sums it adds into, its refusals and the tuner's choice; the whole decode step with it against HF
greedy ids is in test_fused_kernels.py."""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from tritonllm.runtimes.kernels import attention_o as ao
from tritonllm.runtimes.kernels import fused as fk
from tritonllm.runtimes.kernels import gemv
from tritonllm.runtimes.kernels.rope_attention import rope_attention

from .test_rope_attention import HKV, D, H, inputs, same_pools

N = 40  # o's output columns: not a multiple of any tile's block, so the last block is masked


def o_weight(seed: int, fp8: bool):
    """(o's weight [N, H*D], its per-output-channel scale or None)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, H * D, generator=g) / 8
    if not fp8:
        return w, None
    scale = w.abs().amax(1) / 448.0
    return (w / scale[:, None]).to(torch.float8_e4m3fn), scale


def run_both(seed, config, tile, fp8_kv=False, fp8_w=False, rows=3, **attn):
    """(fused sums [rows, N], its pools), (rope_attention then o in float32, its pools)."""
    x, w, cos, sin, pos, kp, vp, table, scales = inputs(seed, fp8_kv)
    product, o = (x @ w.T)[:rows], o_weight(seed + 1, fp8_w)
    writes, limit = torch.arange(rows), 40
    pools = [(kp.clone(), vp.clone()) for _ in range(2)]
    args = (cos[:rows], sin[:rows], pos[:rows], writes)
    at = ao.RowAttention(*args, *pools[0], table, H, limit, config, kv_scale=scales, **attn)
    fused = ao.attention_o(product, at, o, tile)
    a = rope_attention(product, *args, *pools[1], table, H, limit, config, kv_scale=scales, **attn)
    return (fused.total(), pools[0]), (a.float() @ gemv.dequantized(*o).T, pools[1])


def close(got, want):
    torch.testing.assert_close(got.float().view_as(want), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tile", ao.TILES)
def test_every_tile_matches_the_attention_then_o(tile):
    (got, pools), (want, ref_pools) = run_both(0, (16, 4, 3), tile)
    close(got, want)
    same_pools(pools, ref_pools)


@pytest.mark.parametrize("config", [(16, 4, 3), (16, 4, 3, True), (32, 2, 3)])
@pytest.mark.parametrize("attn", [{}, {"window": 9, "scale": 0.3}, {"softcap": 2.0}])
def test_attention_forms_match(config, attn):
    (got, pools), (want, ref_pools) = run_both(1, config, (32, 4, 2), **attn)
    close(got, want)
    same_pools(pools, ref_pools)


def test_fp8_cache_and_fp8_weights_match_the_dequantized_reference():
    """An fp8 cache (stored and read as the two kernels do) and float8 o weights with their scales."""
    (got, pools), (want, ref_pools) = run_both(2, (16, 4, 3, True), (64, 4, 2), fp8_kv=True, fp8_w=True)
    close(got, want)
    same_pools(pools, ref_pools)


def test_a_split_k_product_is_read_as_its_sum():
    x, w, cos, sin, pos, kp, vp, table, _ = inputs(3, False)
    y, o = (x @ w.T).view(3, -1), o_weight(4, False)
    parts = torch.stack([y / 2, y / 2])
    split = gemv.SplitK(parts, torch.float32)
    at = ao.RowAttention(cos, sin, pos, torch.arange(3), kp.clone(), vp.clone(), table, H, 40, (16, 4, 3))
    close(ao.attention_o(split, at, o, (32, 4, 2)).total(), ao.attention_o(y, at, o, (32, 4, 2)).total())


def test_the_sums_add_into_what_the_buffer_holds_and_the_add_norm_zeroes_them():
    """Sums already in the buffer are added to (the atomics' contract); the add + norm after it
    reads them as the product and leaves the buffer at zero for the next layer."""
    x, w, cos, sin, pos, kp, vp, table, _ = inputs(5, False)
    product, o = x @ w.T, o_weight(6, False)
    sums, at = (
        torch.full((3, N), 0.5),
        ao.RowAttention(cos, sin, pos, torch.arange(3), kp, vp, table, H, 40, (16, 4, 3)),
    )
    acc = ao.attention_o(product, at, o, (32, 4, 2), sums)
    want = ao.attention_o(product, at, o, (32, 4, 2))
    close(acc.total(), want.total() + 0.5)
    residual, norm = torch.zeros(3, 1, N), torch.ones(N)
    out = fk.add_rms_norm(acc, residual, norm, 1e-5)
    close(residual, want.total().view(3, 1, N) + 0.5)
    assert out.shape == (3, 1, N) and not sums.any()


@pytest.mark.parametrize(
    "config,rows,o,match",
    [
        ((16, 4, 3, False, 2), 3, (N, H * D), "one split"),
        ((16, 4, 3), 5, (N, H * D), "at most 4"),
        ((16, 4, 3), 3, (N, H * D + 1), "needs one split"),
    ],
)
def test_refusals_name_the_value_and_the_fix(config, rows, o, match):
    g = torch.Generator().manual_seed(7)
    product = torch.randn(rows, (H + 2 * HKV) * D, generator=g)
    cos = sin = torch.zeros(rows, D)
    pool = torch.zeros(8, HKV, 8, D)
    table = torch.zeros(rows, 4, dtype=torch.int32)
    at = ao.RowAttention(
        cos, sin, torch.zeros(rows, dtype=torch.long), torch.arange(rows), pool, pool, table, H, 16, config
    )
    with pytest.raises(ValueError, match=match):
        ao.attention_o(product, at, (torch.zeros(o), None), (32, 4, 2))


@pytest.mark.parametrize("fused_ms,chosen", [(0.5, {1: (32, 4, 2)}), (0.99, {}), (3.0, {})])
def test_the_tuner_keeps_it_only_where_it_times_faster(monkeypatch, fused_ms, chosen):
    """Every tile that agrees is timed over every layer; the fastest is kept where it takes under
    98 % of the rotary stage's time + o's (microseconds from their reports: 1 ms here), and a batch of more rows than
    MAX_ROWS or a split attention config is not tried (the timer stands in for CUDA graphs)."""
    from tritonllm.runtimes.kernels import timing

    def timed(fn, reps=5):
        fn()
        return next(times)

    times = iter([fused_ms, 9.0])
    monkeypatch.setattr(ao, "TILES", ((32, 4, 2), (64, 4, 2)))
    monkeypatch.setattr(timing, "graph_ms", timed)
    caches = [(torch.randn(12, HKV, 8, D), torch.randn(12, HKV, 8, D), None) for _ in range(2)]
    o_layers = [o_weight(i, False) for i in range(2)]
    attention = {1: (16, 4, 3), 2: (16, 4, 3, False, 2), 8: (16, 4, 3)}
    consume = lambda y: fk.add_rms_norm(y, torch.zeros(y.parts.shape[1], 1, N), torch.ones(N), 1e-5)
    rope_us, o_us = {1: 600.0, 2: 600.0, 8: 600.0}, {1: 400.0, 2: 400.0, 8: 400.0}
    found, report = ao.tune(caches, H, o_layers, attention, [1, 2, 8], rope_us, o_us, 20, torch.float32, consume, False)
    assert found == {(ao.KEY, b): t for b, t in chosen.items()}
    assert [r["rows"] for r in report] == [1] and "as tuned" in report[0]["us"]


@pytest.mark.parametrize("pdl", [False, True])
def test_tiles_asking_l2_for_os_weight_are_candidates_only_where_the_step_launches_with_pdl(monkeypatch, pdl):
    """Each tile is also tried with o's weight asked of L2 before the attention (a 4th number 1),
    where the decode step launches with PDL; the prefetch is never asked for otherwise."""
    from tritonllm.runtimes.kernels import timing

    checked = []
    monkeypatch.setattr(
        timing, "check_all", lambda checks, device, ref: checked.append(len(checks)) or [False] * len(checks)
    )
    caches = [(torch.randn(12, HKV, 8, D), torch.randn(12, HKV, 8, D), None)]
    consume = lambda y: y
    found, _ = ao.tune(caches, H, [o_weight(0, False)], {1: (16, 4, 3)}, [1], {1: 1.0}, {1: 1.0}, 20, torch.float32,
                       consume, pdl)  # fmt: skip
    assert checked == [len(ao.TILES) * (2 if pdl else 1)] and found == {}
