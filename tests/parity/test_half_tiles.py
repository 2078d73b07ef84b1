"""Small-batch tiles that widen 8-bit weights to fp16 and multiply x in fp16 (a config's 6th number
3, `gemv.HALF_TILES`), on Triton's interpreter: the product of the dequantized weight within fp16's
rounding of x, for float8 and int8 weights, rows past fp16's range included; 16-bit weights refused;
offered by the tuner for 8-bit weights only; and in a decode step the logits of plain tiles."""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from tritonllm.config import EngineConfig
from tritonllm.model import quant
from tritonllm.model.modeling import CausalLM, load_hf
from tritonllm.runtimes.kernels import gemv
from tritonllm.runtimes.torch_cuda import TorchCudaRuntime
from tritonllm.runtimes.torch_cuda.tuning import PROJECTIONS

# (rows of W, K step, warps, stages, splits, 3: fp16 products, swapped): interpreter-sized
TILES = [(16, 32, 4, 2, 1, 3, 0), (32, 32, 4, 2, 2, 3, 0), (16, 32, 4, 2, 1, 3, 1), (32, 64, 4, 2, 2, 3, 1)]


@pytest.mark.parametrize("scheme", ["fp8", "int8-wo"])
@pytest.mark.parametrize("config", TILES)
def test_a_half_tile_multiplies_the_dequantized_weight(scheme, config):
    """Ragged N, a bias, rows of very different ranges (float32 x: the interpreter has no true
    bf16): the float64 product of x and q x scale, off by no more than x's rounding to fp16 (2^-11
    relative) allows."""
    torch.manual_seed(3)
    q, scale = quant.quantize_weight(torch.randn(40, 128), scheme)
    x = torch.randn(3, 1, 128) * torch.logspace(-2, 2, 3)[:, None, None]
    bias = torch.randn(40)
    got = gemv.dense(gemv.small_matmul(x, q, bias, config, scale)).view(3, 40).double()
    w = q.double() * scale.double()[:, None]
    exact = x.double().view(3, 128) @ w.t() + bias.double()
    bound = (x.double().abs().view(3, 128) @ w.abs().t()) * 2**-11
    assert ((got - exact).abs() <= bound + 1e-6).all()
    plain = gemv.dense(gemv.small_matmul(x, q, bias, (*config[:5], 0, config[6]), scale)).view(3, 40).double()
    assert (got - exact).abs().max() > (plain - exact).abs().max()  # x really went through fp16


def test_rows_beyond_fp16s_range_are_scaled_by_a_power_of_two_not_clipped():
    """A row past 2^15 (as act(gate) x up can be) keeps its value; a small row beside it, its bits."""
    torch.manual_seed(5)
    q, scale = quant.quantize_weight(torch.randn(16, 64), "fp8")
    x = torch.randn(2, 64) * torch.tensor([[3e5], [1e-3]])
    got = gemv.dense(gemv.small_matmul(x, q, None, TILES[0], scale)).double()
    w = q.double() * scale.double()[:, None]
    bound = (x.double().abs() @ w.abs().t()) * 2**-11
    assert torch.isfinite(got).all() and ((got - x.double() @ w.t()).abs() <= bound + 1e-9).all()


def test_a_half_tile_refuses_16_bit_weights():
    with pytest.raises(ValueError, match="widens 8-bit weights to fp16: got torch.bfloat16"):
        gemv.small_matmul(torch.randn(2, 64), torch.randn(16, 64).bfloat16(), None, TILES[0])


@pytest.mark.parametrize("rows", [1, 16, 64])
def test_half_tiles_are_candidates_for_8_bit_weights_only(rows):
    w = torch.randn(64, 4096)
    fp8, int8 = quant.quantize_weight(w, "fp8")[0], quant.quantize_weight(w, "int8-wo")[0]
    offered = lambda weight, quantized: [
        c
        for c in gemv.candidates(rows, weight, quantized, True, gemv.CONFIGS, gemv.DOT_CONFIGS)
        if len(c) >= 6 and c[5] == gemv.X_HALF
    ]
    assert offered(fp8, True) and offered(int8, True) and not offered(w.bfloat16(), False)
    assert {c[6] for c in offered(fp8, True)} == {0, 1} and {c[4] for c in offered(fp8, True)} == {1, 2, 4}


@pytest.mark.parametrize("scheme", ["fp8", "int8-wo"])
def test_a_decode_step_on_half_tiles_gives_the_plain_tiles_logits(tiny_dir, scheme, monkeypatch):
    """Decode steps at 1-2 rows with every product on a half tile: the logits of the same steps on
    the tiles that widen the weight to the activations' type, and the half tiles really ran."""
    from tritonllm.runtimes.base import StepInput

    hf = load_hf(tiny_dir)
    limits = dict(max_slots=2, max_context=64, max_tokens_limit=32, default_max_tokens=8)
    cfg = EngineConfig(runtime="torch-cuda", quantization=scheme, **limits)
    plain = {(k, r): (32, 32, 4, 2) for k in PROJECTIONS for r in (1, 2)}
    half = {key: TILES[1] for key in plain}
    calls, real = [], gemv.small_matmul
    monkeypatch.setattr(gemv, "small_matmul", lambda x, w, b, c, *a: calls.append(c) or real(x, w, b, c, *a))
    runs = []
    for table in (half, plain):
        model = CausalLM(hf)
        quant.quantize_model(model, scheme)
        rt = TorchCudaRuntime(None, cfg, model=model, device="cpu", triton_kernels=True, gemv_table=table)
        rt.step([StepInput(0, [5, 6, 7, 8, 9], 0), StepInput(1, [12, 13, 14], 0)])
        runs.append([rt.step([StepInput(0, [3], 5), StepInput(1, [4], 3)]), rt.step([StepInput(0, [2], 6)])])
    for got, ref in zip(*runs):
        torch.testing.assert_close(got, ref, atol=2e-2, rtol=2e-2)
    assert calls.count(TILES[1]) == 2 * 4 * len(CausalLM(hf).layers)
