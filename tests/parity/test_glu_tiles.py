"""gate_up's product making the activation itself (`small_matmul(..., glu=...)`), on Triton's
interpreter: bit for bit the activation kernel's output on gate_up's product (every unsplit tile
form, SwiGLU and GeGLU, float8 weights with their scales, rows rounded per row), its refusals,
the tuner's comparison with gate_up + the activation kernel + down, and a decode step on it
giving the unfused step's ids."""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from tritonllm.model import quant
from tritonllm.runtimes.kernels import fused, gemv, qmatmul

F, K = 48, 64  # the activation's width (gate_up's N is 2F) and gate_up's K: interpreter-sized
HALF = torch.float16  # the interpreter's bf16 tensor-core products are wrong (test_gated_tiles)
PLAIN = [(4, 64, 4), (16, 32, 4, 2), (16, 32, 4, 2, 1, 0, 1)]  # gemv, dot, swapped
FLOAT8 = [(16, 32, 4, 2, 1, 1), (16, 32, 4, 2, 1, 1, 1), (16, 32, 4, 2, 1, 0, 1)]  # float8 x float8, widened
ROUNDED = [(16, 32, 4, 2, 1, 2, 0), (16, 32, 4, 2, 1, 2, 1)]  # rows rounded per row by their producer


def weight(fp8: bool):
    w = torch.randn(2 * F, K)
    return quant.quantize_weight(w, "fp8") if fp8 else (w.to(HALF), None)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize(
    "config, fp8", [(c, False) for c in PLAIN] + [(c, True) for c in FLOAT8] + [(c, True) for c in ROUNDED]
)
def test_the_glu_tile_is_the_activation_kernel_on_gate_ups_product(config, fp8, activation):
    """Each program's gate and up tiles are the plain tile's sums in the same order, rounded to
    the activations' type before the activation as the stored product is: equal bit for bit."""
    torch.manual_seed(3)
    w, scale = weight(fp8)
    bias = torch.randn(2 * F).to(HALF) if not fp8 else None
    for rows in (1, 3):
        x = torch.randn(rows, 1, K).to(HALF)
        if gemv.takes_rounded(config):
            x = qmatmul.round_rows(x, w.dtype)
        want = fused.activate_mul(gemv.small_matmul(x, w, bias, config, scale), activation)
        got = gemv.small_matmul(x, w, bias, config, scale, glu=activation)
        assert got.shape == want.shape == (rows, 1, F) and torch.equal(got, want)


def test_a_glu_tile_is_refused_split_or_on_a_gated_input():
    w, _ = weight(False)
    x = torch.randn(1, 1, K).to(HALF)
    with pytest.raises(ValueError, match="whole sums of a plain x: unsplit only"):
        gemv.small_matmul(x, w, None, (16, 32, 4, 2, 2), glu="silu")
    with pytest.raises(ValueError, match="activation 'relu' is not a kernel form"):
        gemv.small_matmul(x, w, None, PLAIN[1], glu="relu")
    gated = gemv.Gated(torch.randn(1, 1, 2 * K).to(HALF), "silu")
    with pytest.raises(ValueError, match="whole sums of a plain x: unsplit only"):
        gemv.small_matmul(gated, torch.randn(2 * F, K).to(HALF), None, PLAIN[1], glu="silu")


@pytest.mark.parametrize("glu_us, chosen", [(1.0, True), (2.5, False)])
def test_the_tuner_keeps_the_glu_pair_only_where_it_beats_gate_up_the_activation_and_down(monkeypatch, glu_us, chosen):
    """From `tune`'s timings (us over the layers, each with its consumer): gate_up's best 2.0 (a
    split tile, with the activation kernel), down's best 2.0 (a tile taking rows rounded per row)
    and 2.5 (one taking x as it is). The glu tile timed at `glu_us`: kept (with the plain down
    tile) where glu + 2.5 < 2.0 + 2.0; only unsplit gate_up tiles that take x as gate_up's entry
    does are tried, each checked first."""
    from tritonllm.runtimes.kernels import gemv_tuning

    torch.manual_seed(9)
    mats = [weight(True) for _ in range(2)]
    mats = [(w, None, s) for w, s in mats]
    rounded_down, plain_down = (16, 32, 4, 2, 1, 2, 0), (16, 32, 4, 2, 1, 1)
    report = [
        {"kind": "gate_up", "rows": 1, "us": {"cublas": 9.0, str(PLAIN[1]): 3.0, "(16, 32, 4, 2, 2)": 2.0}},
        {"kind": "down", "rows": 1, "us": {"cublas": 9.0, str(rounded_down): 2.0, str(plain_down): 2.5}},
    ]
    tried = []

    def timed(fn, reps=5):
        fn()
        tried.append(1)
        return glu_us * 1e-3  # ms

    monkeypatch.setattr(gemv_tuning, "graph_ms", timed)
    table, out = gemv_tuning.tune_glu(mats, report, {("gate_up", 1): PLAIN[1]}, [1, 2], "silu", HALF, None)
    assert len(tried) == 1  # the split tile is not a glu candidate; rows 2 have no timings
    want = {(gemv.GLU_KEYS[0], 1): PLAIN[1], (gemv.GLU_KEYS[1], 1): plain_down} if chosen else {}
    assert table == want and [r["rows"] for r in out] == [1]
