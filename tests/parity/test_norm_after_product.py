"""The residual add + norm made by a product's last program (`add_norm.after_product`), on
Triton's interpreter: the same residual and result as the product followed by `fused.add_rms_norm`
(every tile form, split along K, rounded per row, Gemma's pre-norm, several rows) and the counter
back at 0 after every launch. The compiled form's barrier and acquire-release count: test_pdl."""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from tritonllm.model import quant
from tritonllm.runtimes.kernels import fused, gemv
from tritonllm.runtimes.kernels.add_norm import NormAfter
from tritonllm.runtimes.kernels.rows import QuantRows

K, E = 96, 40  # the product's input width and output width (the residual's): interpreter-sized
HALF = torch.float16  # the interpreter's bf16 tensor-core products are wrong (test_gated_tiles)
TILES = [(4, 64, 4), (16, 32, 4, 2), (16, 32, 4, 2, 2), (16, 32, 4, 2, 1, 0, 1)]  # gemv, dot, split, swapped
FLOAT8 = [(16, 32, 4, 2, 1, 1), (16, 32, 4, 2, 3, 1, 1)]  # float8 x float8, split and swapped


def both_ways(x, w, scale, config, residual, norm_w, pre, quantize):
    """(residual, result) of the product + add_rms_norm, then of the fused form (its own residual copy)."""
    res_a, res_b = residual.clone(), residual.clone()
    plain = fused.add_rms_norm(gemv.small_matmul(x, w, None, config, scale), res_a, norm_w, 1e-5, pre, quantize)
    counter = torch.zeros(1, dtype=torch.int32)
    then = NormAfter(res_b, norm_w, 1e-5, pre, quantize, counter)
    for _ in range(2):  # a second launch finds the counter back at 0
        res_b.copy_(residual)
        got = gemv.small_matmul(x, w, None, config, scale, then=then)
        assert counter.item() == 0
    return (res_a, plain), (res_b, got)


@pytest.mark.parametrize("pre", [False, True])
@pytest.mark.parametrize("config, fp8", [(c, False) for c in TILES] + [(c, True) for c in FLOAT8])
def test_the_last_programs_add_and_norm_equal_the_norm_kernels(config, fp8, pre):
    """Bit for bit: the last program adds the same (partial sums of the) product into the residual
    and normalises it with the same helper as the add + norm kernel; 1 and 3 rows."""
    torch.manual_seed(5)
    w, scale = quant.quantize_weight(torch.randn(E, K), "fp8") if fp8 else (torch.randn(E, K).to(HALF), None)
    norm_w, pre_w = torch.rand(E) + 0.5, (torch.rand(E) + 0.5 if pre else None)
    for rows in (1, 3):
        x, residual = torch.randn(rows, 1, K).to(HALF), torch.randn(rows, 1, E).to(HALF)
        (res_a, want), (res_b, got) = both_ways(x, w, scale, config, residual, norm_w, pre_w, None)
        assert torch.equal(res_a, res_b) and torch.equal(want, got)
        assert not torch.equal(res_a, residual)  # the residual stream really took the product


@pytest.mark.parametrize("config", [(16, 32, 4, 2), (16, 32, 4, 2, 2)])
def test_the_result_rounded_per_row_is_the_norm_kernels(config):
    """For a next product that takes float8 rows: the same e4m3 values and row scales."""
    torch.manual_seed(6)
    w = torch.randn(E, K).to(HALF)
    x, residual = torch.randn(2, 1, K).to(HALF), torch.randn(2, 1, E).to(HALF)
    norm_w = torch.rand(E) + 0.5
    (res_a, want), (res_b, got) = both_ways(x, w, None, config, residual, norm_w, None, torch.float8_e4m3fn)
    assert isinstance(got, QuantRows) and torch.equal(res_a, res_b)
    assert torch.equal(got.q[:2].float(), want.q[:2].float()) and torch.equal(got.scale[:2], want.scale[:2])


@pytest.mark.parametrize("fused_ms, chosen", [(1.0, {1, 2}), (3.0, set())])
def test_the_tuner_keeps_the_fused_form_only_where_it_times_faster(monkeypatch, fused_ms, chosen):
    """`add_norm.tune` checks the fused form against the kernel on layer 0 and times both over
    every layer (the GPU's CUDA graph replays stood in for: one run each, a fake clock); a float8
    tile that takes rounded rows gets them, and the norm after it rounds where `rounds` says."""
    from tritonllm.runtimes.kernels import add_norm, timing

    def timed(fn, reps=5):
        fn()
        return next(times)

    times = iter([2.0, fused_ms] * 2)  # (norm kernel, in products) per batch
    monkeypatch.setattr(timing, "graph_ms", timed)
    torch.manual_seed(8)
    o = [(w.to(HALF), None, None) for w in torch.randn(2, E, K)]
    down = [quant.quantize_weight(torch.randn(E, 2 * K), "fp8") for _ in range(2)]
    products = {"o": o, "down": [(w, None, s) for w, s in down]}
    configs = {b: {"o": TILES[1], "down": (16, 32, 4, 2, 1, 2, 0)} for b in (1, 2)}  # down: rounded rows
    rounds = {b: {"o": torch.float8_e4m3fn, "down": None} for b in (1, 2)}
    got, report = add_norm.tune(products, configs, rounds, HALF, None)
    assert got == chosen and [r["batch"] for r in report] == [1, 2]
    assert report[0]["us"] == {"norm kernel": 2000.0, "in products": 1e3 * fused_ms}
