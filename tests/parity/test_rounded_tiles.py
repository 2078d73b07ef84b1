"""Small-batch tiles that take their float8 input rounded per row by its producer (a config's 6th
number 2, `gemv.ROUNDED_TILES`), on Triton's interpreter: the product of exactly the rounded rows,
the FP8 GEMM's on the same input, refused on an input of the other kind, offered by the tuner only
where a producer rounds, and in a decode step the logits of the FP8 GEMM on the same rows."""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from tritonllm.config import EngineConfig
from tritonllm.model import quant
from tritonllm.model.modeling import CausalLM, load_hf
from tritonllm.runtimes.kernels import gemv, gemv_tuning, qmatmul
from tritonllm.runtimes.torch_cuda import TorchCudaRuntime
from tritonllm.runtimes.torch_cuda.tuning import PROJECTIONS, ROUNDED_BY_PRODUCER

E4M3 = torch.float8_e4m3fn
# (rows of W, K step, warps, stages, splits, 2: x rounded per row, swapped): interpreter-sized
TILES = [(16, 32, 4, 2, 1, 2, 0), (32, 32, 4, 2, 2, 2, 0), (16, 32, 4, 2, 1, 2, 1), (32, 64, 4, 2, 2, 2, 1)]


@pytest.mark.parametrize("config", TILES)
def test_a_rounded_tile_multiplies_exactly_the_rounded_rows(config):
    """Rows of very different ranges, ragged N, a bias, unsplit and split, unswapped and swapped:
    the product of the dequantized rows and weight, and the FP8 GEMM's on the same QuantRows."""
    torch.manual_seed(7)
    q, scale = quant.quantize_weight(torch.randn(40, 128), "fp8")
    x = torch.randn(3, 1, 128) * torch.logspace(-2, 2, 3)[:, None, None]
    bias = torch.randn(40)
    rows = qmatmul.round_rows(x, E4M3)
    got = gemv.dense(gemv.small_matmul(rows, q, bias, config, scale)).view(3, 40)
    exact = (rows.q[:3].float() * rows.scale[:3]).view(3, 1, 128)
    torch.testing.assert_close(got, gemv.reference(exact, q, bias, scale).view(3, 40), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got, qmatmul.fp8_matmul(rows, q, scale, bias).view(3, 40), atol=1e-4, rtol=1e-4)


def test_a_rounded_tile_and_its_input_must_agree():
    q, scale = quant.quantize_weight(torch.randn(16, 64), "fp8")
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="a 6th number 2 takes QuantRows"):
        gemv.small_matmul(x, q, None, TILES[0], scale)
    with pytest.raises(ValueError, match="got rows rounded to float8"):
        gemv.small_matmul(qmatmul.round_rows(x, E4M3), q, None, (16, 32, 4, 2), scale)
    w, _ = quant.quantize_weight(torch.randn(16, 64), "int8-wo")
    with pytest.raises(ValueError, match="needs float8 weights"):
        gemv.small_matmul(qmatmul.round_rows(x, E4M3), w, None, TILES[0], scale)


@pytest.mark.parametrize("rows", [1, 16])
def test_rounded_tiles_are_candidates_only_for_float8_rows_a_producer_rounds(rows):
    w = torch.randn(64, 4096)
    fp8, int8 = quant.quantize_weight(w, "fp8")[0], quant.quantize_weight(w, "int8-wo")[0]
    offered = lambda weight, rounded: [
        c
        for c in gemv_tuning.candidates(rows, weight, True, True, gemv.CONFIGS, gemv.DOT_CONFIGS, rounded)
        if gemv.takes_rounded(c)
    ]
    assert offered(fp8, True) and not offered(fp8, False) and not offered(int8, True)
    assert {c[6] for c in offered(fp8, True)} == {0, 1} and {c[4] for c in offered(fp8, True)} == {1, 2, 4, 8}
    assert gemv.takes_rounded(gemv.FP8_GEMM) and not gemv.takes_rounded((32, 256, 4, 4, 1, 1))


def test_a_decode_step_on_rounded_tiles_gives_the_fp8_gemms_logits(tiny_dir, monkeypatch):
    """Decode steps at 1-2 rows with every rounded kind on a rounded tile (o on a plain one): the
    logits of the same steps with those kinds on the FP8 GEMM (the same rounded rows; float32 sums
    in another order), and each rounded kind's tile really gets QuantRows, layer 0's qkv too (its
    input comes from a plain norm and is rounded for it)."""
    from tritonllm.runtimes.base import StepInput

    hf = load_hf(tiny_dir)
    cfg = EngineConfig(
        runtime="torch-cuda", max_slots=2, max_context=64, max_tokens_limit=32, default_max_tokens=8, quantization="fp8"
    )
    large = {(kind, 2048): "fp8" for kind in PROJECTIONS}
    tile, other = {k: TILES[1] for k in ROUNDED_BY_PRODUCER}, {k: (32, 32, 4, 2) for k in PROJECTIONS}
    tables = [
        {(k, r): c for k, c in (other | tile).items() for r in (1, 2)},
        {(k, r): gemv.FP8_GEMM if k in tile else c for k, c in other.items() for r in (1, 2)},
    ]
    calls, real = [], gemv.small_matmul
    monkeypatch.setattr(
        gemv, "small_matmul", lambda x, w, b, c, *a: calls.append((c, type(x).__name__)) or real(x, w, b, c, *a)
    )
    runs = []
    for table in tables:
        model = CausalLM(hf)
        quant.quantize_model(model, "fp8")
        rt = TorchCudaRuntime(
            None, cfg, model=model, device="cpu", triton_kernels=True, gemv_table=table, quant_table=large
        )
        rt.step([StepInput(0, [5, 6, 7, 8, 9], 0), StepInput(1, [12, 13, 14], 0)])
        runs.append([rt.step([StepInput(0, [3], 5), StepInput(1, [4], 3)]), rt.step([StepInput(0, [2], 6)])])
    for got, ref in zip(*runs):
        torch.testing.assert_close(got, ref, atol=2e-3, rtol=2e-3)
    rounded = [kind for c, kind in calls if c == TILES[1]]
    layers = len(CausalLM(hf).layers)
    assert rounded and set(rounded) == {"QuantRows"} and len(rounded) == 2 * 3 * layers
