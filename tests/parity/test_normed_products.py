"""Small-batch products that make their own input, the residual add + RMSNorm (`normed.Normed`),
on Triton's interpreter: bit for bit the add + norm kernel followed by the same tile (gemv,
tensor-core, split, swapped, float8 rows rounded per K step or per row, gate_up making the
activation), the residual stream written once to the other buffer, an added product given as a
tensor, split partial sums or `Accumulated` sums, the norm alone, sums zeroed for the next layer,
and refusals that name the fix."""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from tritonllm.model import quant
from tritonllm.runtimes.kernels import fused, gemv
from tritonllm.runtimes.kernels.rows import Normed

HALF = torch.float16  # the interpreter's bf16 tensor-core products are wrong (test_gated_tiles)
K, N = 96, 40  # K: not a multiple of every K step (masked tails); N: the last block masked
PLAIN = [(4, 64, 4), (2, 32, 4), (16, 32, 4, 2), (16, 32, 4, 2, 2), (16, 32, 4, 2, 1, 0, 1)]
FLOAT8 = [(16, 32, 4, 2, 1, 1), (16, 32, 4, 2, 2, 1, 1), (16, 32, 4, 2, 1, 2, 0), (16, 32, 4, 2, 2, 2, 1)]


def weight(fp8: bool, n: int = N, seed: int = 0):
    w = torch.randn(n, K, generator=torch.Generator().manual_seed(seed))
    return quant.quantize_weight(w, "fp8") if fp8 else (w.to(HALF), None)


def stream(rows: int, seed: int = 1):
    """(residual [rows, 1, K], an added product, the norm's weight), rows of different ranges."""
    g = torch.Generator().manual_seed(seed)
    spread = torch.logspace(-1, 1, rows)[:, None, None]
    residual = (torch.randn(rows, 1, K, generator=g) * spread).to(HALF)
    return residual, torch.randn(rows, 1, K, generator=g).to(HALF), (torch.rand(K, generator=g) + 0.5).to(HALF)


def unfused(delta, residual, norm_w, config, w, scale, glu=None):
    """(the add + norm kernel then the tile, the residual stream after the add)."""
    after = residual.clone()
    fmt = w.dtype if gemv.takes_rounded(config) else None
    h = fused.add_rms_norm(delta, after, norm_w, 1e-5, None, fmt)
    return gemv.dense(gemv.small_matmul(h, w, None, config, scale, glu=glu)), after


@pytest.mark.parametrize("config, fp8", [(c, False) for c in PLAIN] + [(c, True) for c in FLOAT8])
@pytest.mark.parametrize("rows", [1, 3])
def test_the_product_equals_the_add_norm_kernel_then_the_tile(config, fp8, rows):
    w, scale = weight(fp8)
    residual, delta, norm_w = stream(rows)
    want, after = unfused(delta, residual, norm_w, config, w, scale)
    out = torch.empty_like(residual)
    got = gemv.dense(gemv.small_matmul(Normed(delta, residual, out, norm_w, 1e-5), w, None, config, scale))
    assert torch.equal(got, want) and torch.equal(out, after)
    assert torch.equal(residual, stream(rows)[0])  # the stream it read is left as it was


@pytest.mark.parametrize("config, fp8", [(PLAIN[0], False), (PLAIN[2], False), (FLOAT8[2], True)])
def test_gate_up_making_the_activation_from_a_normed_input(config, fp8):
    w, scale = weight(fp8, 2 * N)
    residual, delta, norm_w = stream(2)
    want, _ = unfused(delta, residual, norm_w, config, w, scale, glu="silu")
    got = gemv.small_matmul(Normed(delta, residual, torch.empty_like(residual), norm_w, 1e-5), w, None, config,
                            scale, glu="silu")  # fmt: skip
    assert got.shape == (2, 1, N) and torch.equal(got, want)


def test_split_partial_sums_and_accumulated_sums_are_read_as_their_total():
    """An added product given as `SplitK` partial sums or `Accumulated` sums: read as their sum
    rounded to the activations' type, as the add + norm kernel reads them; `Accumulated` sums are
    left for the next Normed product to zero (here: its `clear`)."""
    w, _ = weight(False)
    residual, delta, norm_w = stream(3)
    parts = torch.stack([delta.float().view(3, K) * 0.25, delta.float().view(3, K) * 0.75])
    config = PLAIN[2]
    for given in (gemv.SplitK(parts, HALF), gemv.Accumulated(parts[:1] * 0 + delta.float().view(1, 3, K), HALF)):
        want, after = unfused(given.total().view(3, 1, K), residual, norm_w, config, w, None)
        out = torch.empty_like(residual)
        got = gemv.dense(gemv.small_matmul(Normed(given, residual, out, norm_w, 1e-5), w, None, config))
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        assert torch.equal(out, after)
    sums, other = torch.ones(3, K), torch.full((3, K), 7.0)
    accumulated = gemv.Accumulated(sums.view(1, 3, K), HALF)
    gemv.small_matmul(Normed(accumulated, residual, torch.empty_like(residual), norm_w, 1e-5, other), w, None, config)
    assert not other.any() and sums.eq(1).all()  # the other buffer zeroed, the one read left for the next


@pytest.mark.parametrize("config", [PLAIN[0], PLAIN[3], (64, 32, 4, 2, 2)])
def test_sums_to_clear_are_zeroed_whatever_the_grid(config):
    w, _ = weight(False)
    residual, delta, norm_w = stream(2)
    clear = torch.full((2, 1000), 3.0)  # more than the programs' 256-value blocks, not a multiple
    gemv.small_matmul(Normed(delta, residual, torch.empty_like(residual), norm_w, 1e-5, clear), w, None, config)
    assert not clear.any()


def test_the_norm_alone_leaves_the_residual_stream_unchanged():
    """delta None (a step's first layer): RMSNorm(residual) * weight, as `add_rms_norm(None, ...)`."""
    w, _ = weight(False)
    residual, _, norm_w = stream(2)
    h = fused.add_rms_norm(None, residual.clone(), norm_w, 1e-5)
    want = gemv.small_matmul(h, w, None, PLAIN[2])
    got = gemv.small_matmul(Normed(None, residual, residual, norm_w, 1e-5), w, None, PLAIN[2])
    assert torch.equal(got, want) and torch.equal(residual, stream(2)[0])


def test_refusals_name_the_value_and_the_fix():
    w, _ = weight(False)
    residual, delta, norm_w = stream(2)
    with pytest.raises(ValueError, match="out is the residual itself, which the programs read"):
        gemv.small_matmul(Normed(delta, residual, residual, norm_w, 1e-5), w, None, PLAIN[2])
    with pytest.raises(ValueError, match="norm weight of 96"):
        gemv.small_matmul(Normed(delta, residual, torch.empty_like(residual), norm_w[:8], 1e-5), w, None, PLAIN[2])
    with pytest.raises(ValueError, match="contiguous float32 sums"):
        normed = Normed(delta, residual, torch.empty_like(residual), norm_w, 1e-5, torch.zeros(4, dtype=HALF))
        gemv.small_matmul(normed, w, None, PLAIN[2])
    with pytest.raises(ValueError, match="needs float8 weights"):
        gemv.small_matmul(Normed(delta, residual, torch.empty_like(residual), norm_w, 1e-5), w, None, FLOAT8[2])


def test_the_tuner_keeps_a_tile_making_its_input_only_where_it_is_faster(monkeypatch):
    """At 1 row: qkv's chosen tile and its next fastest timed making their input (the faster
    kept), gate_up's own key skipped (its tile making the activation is read instead, timed alone),
    the LM head's slower form not kept; 2 rows have the fused MLP (no product may make its input),
    32 rows are past `normed.MAX_ROWS`. Every form is checked against the add + norm kernel first."""
    from tritonllm.runtimes.kernels import mlp, normed, normed_tuning

    mats = [(weight(False, seed=s)[0], None, None) for s in range(2)]
    glu_mats = [(weight(False, 2 * N, s)[0], None, None) for s in range(2)]
    a, b, c = PLAIN[2], PLAIN[3], PLAIN[0]
    table = {("qkv_proj", 1): a, ("gate_up", 1): b, (gemv.GLU_KEYS[0], 1): a, ("lm_head", 1): c}
    table |= {("qkv_proj", 2): a, (mlp.KEY, 2): (32, 64, 64, 4, 1, 0, 0), ("qkv_proj", 32): a}
    report = [{"kind": "qkv_proj", "rows": 1, "us": {"cublas": 9.0, str(a): 1.0, str(b): 2.0, str(c): 3.0}}]
    clock = iter([2.0, 1.5, 1.2] + [2.0, 1.0] + [1.0, 1.1])  # ms: qkv's forms, the glu tile's, the head's
    timed = []
    monkeypatch.setattr(normed_tuning, "graph_ms", lambda fn, reps=5: timed.append(fn) or next(clock))
    readers = {"qkv_proj": (mats, None), "gate_up": (glu_mats, None), gemv.GLU_KEYS[0]: (glu_mats, "silu")}
    readers["lm_head"] = (mats[:1], None)
    found, out = normed_tuning.tune(readers, report, table, [1, 2, 32], HALF, False)
    assert found == {(normed.key("qkv_proj"), 1): b, (normed.key(gemv.GLU_KEYS[0]), 1): a}
    assert len(timed) == 7 and [(r["kind"], r["rows"]) for r in out] == [
        (normed.key(k), 1) for k in ("qkv_proj", gemv.GLU_KEYS[0], "lm_head")
    ]
    assert out[2]["chosen"].startswith("add + norm kernel")


def test_where_the_step_launches_with_pdl_each_tile_is_also_timed_asking_l2_for_its_first_k_step(monkeypatch):
    """With PDL each tile making its input is timed without and with its first K step asked of L2
    before its prologue; the prefetching form is kept under `normed.prefetch_key` where fastest.
    (The interpreter has no PDL: the products stand in as records of how they were asked.)"""
    from tritonllm.runtimes.kernels import normed, normed_tuning

    asked = []
    monkeypatch.setattr(normed_tuning, "check_all", lambda checks, device, ref: [True] * len(checks))
    monkeypatch.setattr(normed_tuning, "add_rms_norm", lambda *a, **k: None)
    monkeypatch.setattr(normed_tuning, "small_matmul", lambda x, *a: asked.append((getattr(x, "prefetch", None), a[4])))
    monkeypatch.setattr(normed_tuning, "dense", lambda y: torch.zeros(1))
    clock = iter([2.0, 1.5, 1.2])  # ms: the add + norm kernel + the tile, the tile without and with the prefetch
    monkeypatch.setattr(normed_tuning, "graph_ms", lambda fn, reps=5: (fn(), next(clock))[1])
    mats = [(weight(False, seed=s)[0], None, None) for s in range(2)]
    found, out = normed_tuning.tune({"qkv_proj": (mats, None)}, [], {("qkv_proj", 1): PLAIN[2]}, [1], HALF, True)
    assert found == {(normed.key("qkv_proj"), 1): PLAIN[2], (normed.prefetch_key("qkv_proj"), 1): 1}
    assert out[0]["chosen"] == f"{PLAIN[2]} + L2 prefetch" and len(out[0]["us"]) == 3
    assert {(p, steps) for p, steps in asked if p is not None} == {(0, 0), (1, 0)}  # launched with PDL
