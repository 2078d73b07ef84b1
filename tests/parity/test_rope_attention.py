"""The decode step's rotary + KV write + attention kernel (`rope_attention`), run by Triton's
interpreter on the CPU: against the two kernels it replaces (`rope_kv_write` then
`decode_attention`) on the same paged cache, for every tile form, key splits, windows, soft caps,
fp8 caches and split-K products; the whole decode step with it against HF greedy ids is in
test_fused_kernels.py."""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from tritonllm.runtimes.kernels import attention as ak
from tritonllm.runtimes.kernels import fused as fk
from tritonllm.runtimes.kernels import gemv
from tritonllm.runtimes.kernels.pages import read_pages
from tritonllm.runtimes.kernels.rope_attention import rope_attention
from tritonllm.runtimes.kernels.rope_attention import tune as ra_tune

from .test_fused_kernels import paged, paged_values

H, HKV, D, SLOTS, CTX, PAGE = 8, 2, 16, 4, 48, 8


def inputs(seed: int, fp8: bool):
    """(x [3, 1, 24] and the qkv weight, cos, sin, positions, pools, table, kv scales) of three
    rows holding 5 / 1 / 37 positions (in different pages, one at a page's start)."""
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(3, 1, 24, generator=g), torch.randn((H + 2 * HKV) * D, 24, generator=g) / 4
    ang = torch.randn(3, 1, D // 2, generator=g)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    (kp, table), (vp, _) = (
        paged(torch.randn(SLOTS, HKV, CTX, D, generator=g), PAGE),
        paged_values(torch.randn(SLOTS, HKV, CTX, D, generator=g), PAGE),
    )
    scales = torch.tensor([[0.02, 0.05], [0.03, 0.5]]) if fp8 else None
    if fp8:
        kp, vp = kp.to(torch.float8_e4m3fn), vp.to(torch.float8_e4m3fn)
    return x, w, cos, sin, torch.tensor([5, 1, 37]), kp, vp, table, scales


def both(product, cos, sin, pos, kp, vp, table, scales, limit, config, **attn):
    """(fused output, its pools), (two kernels' output, their pools), each on its own copy of the cache."""
    writes = torch.arange(3)
    pools = [(kp.clone(), vp.clone()) for _ in range(2)]
    fused = rope_attention(product, cos, sin, pos, writes, *pools[0], table, H, limit, config, kv_scale=scales, **attn)
    q = fk.rope_kv_write(product, cos, sin, *pools[1], table, pos, H, HKV, slots=writes, kv_scale=scales)
    two = ak.decode_attention(q, *pools[1], table, pos, limit, config, kv_scale=scales, **attn)
    return (fused, pools[0]), (two, pools[1])


def same_pools(got, want):
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w.float(), atol=0, rtol=0)


@pytest.mark.parametrize(
    "config",
    [ak.ATTENTION_CONFIGS[0], (16, 4, 3, True), (16, 1, 2, False, 2), (16, 4, 3, True, 4), (32, 2, 3, False, 8)],
)
@pytest.mark.parametrize("attn", [{}, {"window": 9, "scale": 0.3}, {"softcap": 2.0}])
def test_rope_attention_matches_the_rotary_then_attention_kernels(config, attn):
    x, w, cos, sin, pos, kp, vp, table, _ = inputs(0, fp8=False)
    (got, got_pools), (want, want_pools) = both(x @ w.T, cos, sin, pos, kp, vp, table, None, CTX, config, **attn)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    same_pools(got_pools, want_pools)  # the new keys / values written where the rotary kernel writes them


@pytest.mark.parametrize("config", [ak.ATTENTION_CONFIGS[0], (16, 4, 3, True, 2)])
def test_rope_attention_on_an_fp8_cache_stores_and_reads_what_the_two_kernels_do(config):
    x, w, cos, sin, pos, kp, vp, table, scales = inputs(1, fp8=True)
    (got, got_pools), (want, want_pools) = both(4 * x @ w.T, cos, sin, pos, kp, vp, table, scales, CTX, config)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)  # fp16 products, summed in other orders
    same_pools(got_pools, want_pools)


def test_rope_attention_reads_a_split_k_product_as_its_sum():
    x, w, cos, sin, pos, kp, vp, table, _ = inputs(2, fp8=False)
    split = gemv.small_matmul(x, w, None, (32, 64, 4, 2, 2))
    assert isinstance(split, gemv.SplitK)
    (got, got_pools), (want, want_pools) = both(split, cos, sin, pos, kp, vp, table, None, CTX, (16, 4, 3))
    (plain, _), _ = both(x @ w.T, cos, sin, pos, kp, vp, table, None, CTX, (16, 4, 3))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, plain, atol=1e-4, rtol=1e-4)
    same_pools(got_pools, want_pools)


def test_rope_attention_writes_the_new_key_to_the_write_slot_only():
    """A padding row writes the scratch slot (`writes`), never the slot it reads."""
    x, w, cos, sin, pos, kp, vp, table, _ = inputs(3, fp8=False)
    before = read_pages(kp, table).clone()
    k2, v2 = kp.clone(), vp.clone()
    rope_attention(x @ w.T, cos, sin, pos, torch.tensor([0, 3, 2]), k2, v2, table, H, CTX, (16, 4, 3))
    after = read_pages(k2, table)
    changed = {(s, p) for s, _, p in (after != before).any(-1).nonzero().tolist()}
    assert changed == {(0, 5), (3, 1), (2, 37)}


@pytest.mark.parametrize("fused_ms,chosen", [(1.0, {1, 2}), (3.0, set())])
def test_the_tuner_takes_the_fused_kernel_only_where_it_times_faster(monkeypatch, fused_ms, chosen):
    """`tune` runs both forms on every layer's cache and keeps the fused one per batch where its
    time is the lower (the timer is the GPU's CUDA graph replays, stood in for here: one run each)."""
    from tritonllm.runtimes.kernels import timing

    def timed(fn, reps=5):
        fn()
        return next(times)

    times = iter([2.0, fused_ms] * 2)  # (two kernels, fused) per batch
    monkeypatch.setattr(timing, "graph_ms", timed)
    caches = [torch.randn(12, HKV, PAGE, D) for _ in range(4)]
    table, report = ra_tune(caches[:2], caches[2:], H, {1: (16, 4, 3), 2: (16, 4, 3, True, 2)}, 20, torch.float32)
    assert table == chosen and [r["batch"] for r in report] == [1, 2]
