"""Quantized engines against their dequantized references, on the CPU.

torch-cuda's 8-bit weights (fp8 e4m3, int8-wo): the round trip of the per-channel absmax scheme,
the OpenAI-Triton products that read 8-bit weights (run by Triton's interpreter, fp32), the FP8
Tensor Core path's per-token activation rounding (torch._scaled_mm runs on the CPU too), and the
whole engine on those kernels against the quantized model on the reference ops (greedy ids).
The accuracy on real text is a benchmark (bench.quant_eval); built engine folders are in
test_quantized_builds.py."""

import os
from dataclasses import replace

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from tritonllm.config import EngineConfig
from tritonllm.engine.inprocess import InProcessEngine
from tritonllm.model import quant
from tritonllm.model.modeling import CausalLM, load_hf
from tritonllm.runtimes.kernels import gemv, gemv_tuning, qmatmul
from tritonllm.runtimes.torch_cuda import TorchCudaRuntime
from tritonllm.runtimes.torch_cuda.tuning import PROJECTIONS
from tritonllm.text import TokenizerFiles

SCHEMES = ["int8-wo", "fp8"]
TILE = (32, 32, 32, 4, 1)  # the interpreter's smallest sensible tile (tl.dot needs 16+)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_weights_round_trip_within_the_formats_step(scheme):
    torch.manual_seed(0)
    w = torch.randn(48, 64) * torch.logspace(-3, 1, 48)[:, None]  # channels of very different ranges
    q, scale = quant.quantize_weight(w, scheme)
    dtype, qmax = quant.SCHEMES[scheme]
    assert q.dtype == dtype and scale.shape == (48,)
    assert torch.equal(q.float().abs().amax(1), torch.full((48,), qmax))  # each channel's absmax maps to qmax
    err = (q.float() * scale[:, None] - w).abs()
    if scheme == "int8-wo":  # round to nearest: half a step
        assert (err <= scale[:, None] / 2 * (1 + 1e-5)).all()
    else:  # e4m3: 3 mantissa bits (relative 2^-4), subnormal steps of 2^-9 below 2^-6
        assert (err <= w.abs() * 2**-4 + scale[:, None] * 2**-10).all()


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("config", [gemv.CONFIGS[1], (16, 32, 4, 2), (16, 32, 4, 2, 2)])
def test_small_batch_products_read_8bit_weights(scheme, config):
    """gemv (CUDA cores), skinny_dot (tensor cores) and its split-K form on ragged shapes, with a bias."""
    torch.manual_seed(1)
    q, scale = quant.quantize_weight(torch.randn(40, 80), scheme)
    x, bias = torch.randn(5, 1, 80), torch.randn(40)
    got = gemv.dense(gemv.small_matmul(x, q, bias, config, scale)).view(5, 1, 40)
    torch.testing.assert_close(got, gemv.reference(x, q, bias, scale), atol=1e-4, rtol=1e-4)


def test_float8_activation_tiles_scale_each_row_and_k_step_by_its_own_range():
    """The 8-bit x 8-bit tile rounds each row's activations per K step with that step's absmax, so
    rows of very different ranges each keep ~3 mantissa bits (a scale shared across rows or steps
    would flush the small ones to zero); unsplit and split along K, with a bias."""
    torch.manual_seed(4)
    q, scale = quant.quantize_weight(torch.randn(48, 128), "fp8")
    x = torch.randn(6, 1, 128) * torch.logspace(-3, 3, 6)[:, None, None]
    x[:, :, 64:] *= 1e-3  # the second K step of every row is far smaller than the first
    bias = torch.randn(48)
    ref = gemv.reference(x, q, bias, scale).view(6, 48) - bias
    for config in [(16, 64, 4, 2, 1, 1), (16, 64, 4, 2, 2, 1)]:
        got = gemv.dense(gemv.small_matmul(x, q, bias, config, scale)).view(6, 48) - bias
        rel = (got - ref).norm(dim=1) / ref.norm(dim=1)
        assert (rel > 0).all() and (rel < 0.1).all(), (config, rel)
        small = gemv.reference(x[:, :, 64:], q[:, 64:], None, scale).view(6, 48)
        second = gemv.dense(gemv.small_matmul(x[:, :, 64:], q[:, 64:], None, config, scale)).view(6, 48)
        assert ((second - small).norm(dim=1) / small.norm(dim=1) < 0.1).all()


@pytest.mark.parametrize("config", [(16, 64, 4, 2, 1, 1, 1), (32, 64, 4, 2, 2, 1, 1), (16, 32, 4, 2, 1, 0, 1)])
def test_swapped_tiles_give_the_unswapped_product(config):
    """With the weight tile as the tensor cores' first operand (float8 activations or the weight
    widened), the product equals the same tile unswapped up to float32 summation order: ragged
    rows and N, split along K or not, with a bias."""
    torch.manual_seed(5)
    q, scale = quant.quantize_weight(torch.randn(40, 128), "fp8")
    x = torch.randn(3, 1, 128) * torch.logspace(-2, 2, 3)[:, None, None]
    bias = torch.randn(40)
    got = gemv.dense(gemv.small_matmul(x, q, bias, config, scale)).view(3, 40)
    same = gemv.dense(gemv.small_matmul(x, q, bias, config[:6], scale)).view(3, 40)
    torch.testing.assert_close(got, same, atol=1e-4, rtol=1e-4)
    if config[5] == 0:
        torch.testing.assert_close(got, gemv.reference(x, q, bias, scale).view(3, 40), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("splits", [1, 2])
def test_swapped_tiles_of_plain_weights_match_linear(splits):
    torch.manual_seed(6)
    w, x, bias = torch.randn(40, 128), torch.randn(3, 1, 128), torch.randn(40)
    got = gemv.dense(gemv.small_matmul(x, w, bias, (16, 32, 4, 2, splits, 0, 1))).view(3, 40)
    torch.testing.assert_close(got, gemv.reference(x, w, bias).view(3, 40), atol=1e-4, rtol=1e-4)


def test_float8_activation_tiles_refuse_other_weights():
    q, scale = quant.quantize_weight(torch.randn(16, 64), "int8-wo")
    with pytest.raises(ValueError, match="needs float8 weights"):
        gemv.small_matmul(torch.randn(1, 64), q, None, (16, 64, 4, 2, 1, 1), scale)


@pytest.mark.parametrize("scheme", [None, *SCHEMES])
def test_small_batch_candidates_offer_tensor_core_tiles_at_one_row(scheme):
    """At 1-8 rows the tuner times the CUDA-core gemv tiles and the tensor-core tiles; beyond, only
    the latter. Split tiles only where a consumer adds up partial sums; float8 activations only
    for float8 weights; swapped tiles for every weight."""
    w = torch.randn(64, 4096)
    if scheme is not None:
        w, _ = quant.quantize_weight(w, scheme)
    q = scheme is not None
    one, many = (
        gemv_tuning.candidates(1, w, q, False, gemv.CONFIGS, gemv.DOT_CONFIGS),
        gemv_tuning.candidates(16, w, q, True, gemv.CONFIGS, gemv.DOT_CONFIGS),
    )
    assert any(len(c) == 3 for c in one) and any(len(c) == 4 for c in one)
    assert all(len(c) >= 4 for c in many) and any(len(c) == 5 for c in many)
    assert all(len(c) < 5 or c[4] == 1 for c in one)
    x8 = [c for c in [*one, *many] if len(c) >= 6 and c[5] == 1]
    assert bool(x8) == (scheme == "fp8")
    swapped = [c for c in [*one, *many] if len(c) == 7 and c[6] == 1]
    assert swapped and all(c[5] == (scheme == "fp8") for c in swapped)  # fp8: float8 x float8; else widened


@pytest.mark.parametrize("scheme", SCHEMES)
def test_large_batch_tiles_match_the_dequantized_reference(scheme):
    torch.manual_seed(2)
    q, scale = quant.quantize_weight(torch.randn(48, 80), scheme)
    x, bias = torch.randn(70, 80), torch.randn(48)
    ref = gemv.reference(x, q, bias, scale)
    torch.testing.assert_close(qmatmul.tile_matmul(x, q, scale, bias, TILE), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(qmatmul.matmul(x, q, scale, None, "reference"), ref - bias)


def test_fp8_gemm_rounds_each_rows_activations_and_nothing_else():
    """The FP8 Tensor Core product equals the reference on activations rounded to e4m3 with one
    scale per row by the row-quantizing kernel (a row count that is no multiple of 16 is padded
    and cut back)."""
    torch.manual_seed(3)
    q, scale = quant.quantize_weight(torch.randn(48, 64), "fp8")
    x = torch.randn(21, 64) * torch.logspace(-2, 2, 21)[:, None]  # rows of very different ranges
    xq, x_scale = qmatmul.quantize_rows(x, torch.float8_e4m3fn)
    got = qmatmul.fp8_matmul(x, q, scale, None)
    torch.testing.assert_close(got, gemv.reference(xq.float() * x_scale, q, None, scale), atol=1e-4, rtol=1e-5)
    assert (xq.float().abs().amax(1) == 448).all()
    rel = (got - gemv.reference(x, q, None, scale)).norm() / gemv.reference(x, q, None, scale).norm()
    assert 0 < rel < 0.1  # the rounding is there, and small (0.03 on the GPU; the interpreter halves a few values)


def test_the_row_quantizing_kernel_matches_the_torch_rounding():
    """One kernel per product instead of five torch ops: the same scales, the same e4m3 values.
    Triton's interpreter drops the carry when rounding up crosses a power of two (125.7 -> 64, not
    128; the GPU's conversion does not: bench.quant_speed counts mismatches there) and rounds some
    subnormals down, so here a value may sit up to a binade low (toward zero), never higher."""
    torch.manual_seed(6)
    x = torch.randn(21, 3000) * torch.logspace(-2, 2, 21)[:, None]
    ref_q, ref_scale = quant.quantize_rows(x)
    q, scale = qmatmul.quantize_rows(x, torch.float8_e4m3fn)
    assert torch.equal(scale, ref_scale)
    a, b = ref_q.float(), q.float()
    low_by_a_binade_at_most = (b.abs() <= a.abs()) & (b.abs() >= a.abs() / 2 - 2**-9) & (a * b >= 0)
    assert low_by_a_binade_at_most.all() and (a == b).float().mean() > 0.9


def test_the_tuned_choice_is_the_smallest_tuned_row_count_at_or_above():
    table = {("o", 128): TILE, ("o", 2048): "fp8", ("down", 128): "reference"}
    assert qmatmul.choose(table, "o", 100) == TILE
    assert qmatmul.choose(table, "o", 129) == "fp8"
    assert qmatmul.choose(table, "o", 5000) == "fp8"
    assert qmatmul.choose(table, "gate_up", 7) == "reference"  # nothing tuned for it


def test_place_keeps_the_quantized_formats(tiny_dir):
    model = CausalLM(load_hf(tiny_dir))
    quant.quantize_model(model, "fp8")
    quant.place(model, torch.device("cpu"), torch.bfloat16)
    layer = model.layers[0]
    assert layer.qkv_proj.qweight.dtype == torch.float8_e4m3fn and layer.qkv_proj.scale.dtype == torch.float32
    assert model.embed.dtype == torch.bfloat16 and layer.ln1.weight.dtype == torch.bfloat16
    assert quant.scheme_of(model) == "fp8"


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_engine_on_the_kernels_gives_the_reference_greedy_ids(tiny_dir, scheme):
    """Prefill on the tiled 8-bit product, decode on gemv tiles: the ids of the same quantized
    weights on the reference ops (QuantLinear's dequantized product)."""
    from .test_engine_parity import PROMPTS

    hf, tok = load_hf(tiny_dir), TokenizerFiles(tiny_dir)
    prompts = [tok.encode(p) for p in PROMPTS[:3]]
    cfg = EngineConfig(runtime="torch-cuda", max_slots=2, max_context=160, max_tokens_limit=64, quantization=scheme)
    small = {(kind, rows): gemv.CONFIGS[1] for kind in PROJECTIONS for rows in (1, 2)}
    large = {(kind, 2048): TILE for kind in PROJECTIONS}
    runs = []
    for kernels in (False, True):
        model = CausalLM(hf)
        quant.quantize_model(model, scheme)
        kw = {"triton_kernels": True, "gemv_table": small, "quant_table": large} if kernels else {}
        runtime = TorchCudaRuntime(None, cfg, model=model, device="cpu", fused_kernels=kernels, **kw)
        assert runtime.describe()["quantization"] == scheme
        with InProcessEngine(None, cfg, runtime=runtime) as eng:
            seqs = [
                eng.submit(ids, max_tokens=n, temperature=0.0, ignore_eos=True) for ids, n in zip(prompts, [9, 4, 6])
            ]
            runs.append([s.wait(300).ids for s in seqs])
    assert runs[0] == runs[1]


def test_a_decode_step_the_tuner_gave_to_the_fp8_gemm_runs_it_on_rows_its_producers_rounded(tiny_dir, monkeypatch):
    """gemv.FP8_GEMM in the small-batch table: the decode step's products are the FP8 GEMM, fed
    e4m3 rows by add + norm and the activation (not by a quantize of their own) for the kinds they
    make, and the ids equal those of the same GEMM reached through the large-batch table."""
    from .test_engine_parity import PROMPTS

    hf, tok = load_hf(tiny_dir), TokenizerFiles(tiny_dir)
    prompts = [tok.encode(p) for p in PROMPTS[:2]]
    cfg = EngineConfig(runtime="torch-cuda", max_slots=2, max_context=160, max_tokens_limit=64, quantization="fp8")
    calls, real = [], qmatmul.fp8_matmul
    monkeypatch.setattr(qmatmul, "fp8_matmul", lambda x, *a, **kw: calls.append(type(x).__name__) or real(x, *a, **kw))
    small = {(kind, rows): gemv.FP8_GEMM for kind in PROJECTIONS for rows in (1, 2)}
    large = {(kind, 2048): "fp8" for kind in PROJECTIONS}
    runs = []
    for tables in ({"gemv_table": small, "quant_table": large}, {"gemv_table": {}, "quant_table": large}):
        model = CausalLM(hf)
        quant.quantize_model(model, "fp8")
        runtime = TorchCudaRuntime(None, cfg, model=model, device="cpu", triton_kernels=True, **tables)
        calls.clear()
        with InProcessEngine(None, cfg, runtime=runtime) as eng:
            seqs = [eng.submit(ids, max_tokens=n, temperature=0.0, ignore_eos=True) for ids, n in zip(prompts, [5, 3])]
            runs.append([s.wait(300).ids for s in seqs])
        # each step: every layer's o reads attention's output (a tensor); every other product's
        # input comes rounded by its producer (QuantRows), the first layer's qkv by the norm alone
        assert calls and calls.count("QuantRows") == 3 * calls.count("Tensor")
    assert runs[0] == runs[1]


def test_a_quantized_lm_head_serves_the_ids_of_its_dequantized_reference(tiny_dir):
    """--quantize-lm-head: the head's product on the kernels (a gemv tile reading the 8-bit head at
    1-2 rows) gives the ids of the reference ops over the same dequantized head; the
    head is really rounded (its logits move) and the unquantized head is gone."""
    from .test_engine_parity import PROMPTS

    hf, tok = load_hf(tiny_dir), TokenizerFiles(tiny_dir)
    prompts = [tok.encode(p) for p in PROMPTS[:2]]
    limits = {"max_slots": 2, "max_context": 160, "max_tokens_limit": 64}
    cfg = EngineConfig(runtime="torch-cuda", **limits, quantization="fp8", quantize_lm_head=True)
    # the head's decode tile wide (1,024 vocabulary rows a program: the interpreter runs programs one
    # by one); a prefill's head rows on the dequantized reference
    small = {(kind, rows): gemv.CONFIGS[1] for kind in PROJECTIONS for rows in (1, 2)}
    small |= {("lm_head", rows): (1024, 64, 4) for rows in (1, 2)}
    large = {(kind, 2048): TILE for kind in PROJECTIONS} | {("lm_head", 2048): "reference"}
    runs = []
    for kernels in (False, True):
        model = CausalLM(hf)
        quant.quantize_model(model, "fp8")
        report = quant.quantize_head(model)
        assert model.lm_head is None and model.head()[0].dtype == torch.int8  # int8 under fp8 projections
        assert report["quantized_lm_head_bytes"] * 4 == report["lm_head_bytes"]
        kw = {"triton_kernels": True, "gemv_table": small, "quant_table": large} if kernels else {}
        runtime = TorchCudaRuntime(None, cfg, model=model, device="cpu", fused_kernels=kernels, **kw)
        with InProcessEngine(None, cfg, runtime=runtime) as eng:
            seqs = [eng.submit(ids, max_tokens=n, temperature=0.0, ignore_eos=True) for ids, n in zip(prompts, [7, 4])]
            runs.append([s.wait(300).ids for s in seqs])
    assert runs[0] == runs[1]
    plain, rounded = CausalLM(hf), CausalLM(hf)
    quant.quantize_head(rounded)
    h = torch.randn(3, plain.shape.hidden_size)
    a, b = plain.logits(h), rounded.logits(h)
    assert 0 < (a - b).abs().max() < 0.1 * a.abs().max()


def test_an_engine_refuses_a_config_that_disagrees_about_its_lm_head(tiny_dir):
    model = CausalLM(load_hf(tiny_dir))
    quant.quantize_model(model, "fp8")
    quant.quantize_head(model)
    cfg = EngineConfig(runtime="torch-cuda", max_slots=2, max_context=64, max_tokens_limit=32, default_max_tokens=8)
    cfg = replace(cfg, quantization="fp8")
    with pytest.raises(ValueError, match="quantize_lm_head=False.*with --quantize-lm-head"):
        TorchCudaRuntime(None, cfg, model=model, device="cpu")
    with pytest.raises(ValueError, match="quantize_lm_head.*--runtime torch-cuda with --quantization fp8 or int8-wo"):
        EngineConfig(runtime="onnxruntime", quantization="int8", quantize_lm_head=True)


def test_a_quantized_torch_engine_refuses_a_config_of_another_scheme(tiny_dir):
    model = CausalLM(load_hf(tiny_dir))
    quant.quantize_model(model, "int8-wo")
    cfg = EngineConfig(runtime="torch-cuda", max_slots=2, max_context=64, max_tokens_limit=32, default_max_tokens=8)
    with pytest.raises(ValueError, match="quantized 'int8-wo'.*--quantization int8-wo"):
        TorchCudaRuntime(None, cfg, model=model, device="cpu")


@pytest.mark.parametrize(
    "n, width, two_pass",
    [(21, 1500, False), (21, 16384, False), (21, 16500, False), (70, 1500, False), (70, 1500, True)],
)
def test_norm_and_activation_round_their_output_as_the_row_quantizer_does(n, width, two_pass):
    """Where the FP8 GEMM runs, add + norm and the gated activation hand it their output already
    rounded per row: the e4m3 values and scales `quantize_rows` gives their plain output, the
    residual updated the same, and the same product (rows padded to 16s; activation rows of 1,500
    and 16,384 columns rounded from one block; 16,500 columns, or any within
    `rounding_in_two_passes`, in two passes of 1,024-column blocks)."""
    import contextlib

    from tritonllm.runtimes.kernels import fused as fk

    torch.manual_seed(9)
    e4m3, ranges = torch.float8_e4m3fn, torch.logspace(-2, 2, n)[:, None, None]
    x, res, w = torch.randn(n, 1, 96) * ranges, torch.randn(n, 1, 96), torch.randn(96)
    res_rounded = res.clone()
    gu = torch.randn(n, 1, 2 * width) * ranges / 10  # gates up to ~10: no overflow in exp(-g)
    with fk.rounding_in_two_passes() if two_pass else contextlib.nullcontext():
        pairs = [
            (fk.add_rms_norm(x, res, w, 1e-5), fk.add_rms_norm(x, res_rounded, w, 1e-5, quantize=e4m3)),
            (fk.activate_mul(gu), fk.activate_mul(gu, quantize=e4m3)),
        ]
    assert torch.equal(res, res_rounded)
    for plain, rows in pairs:
        k = plain.shape[-1]
        ref_q, ref_scale = qmatmul.quantize_rows(plain.view(n, k), e4m3)
        assert isinstance(rows, qmatmul.QuantRows) and rows.shape == plain.shape and rows.q.shape == (n + -n % 16, k)
        assert torch.equal(rows.q[:n].float(), ref_q.float()) and torch.equal(rows.scale[:n], ref_scale)
        q, scale = quant.quantize_weight(torch.randn(48, k), "fp8")
        assert torch.equal(qmatmul.fp8_matmul(rows, q, scale, None), qmatmul.fp8_matmul(plain, q, scale, None))


def test_fused_row_rounding_leaves_the_fp8_engines_logits_unchanged(tiny_dir):
    """A prefill and a decode step on the fused kernels with every product the FP8 GEMM: the
    producers rounding their outputs for it give the logits of each product rounding its own
    input, bit for bit; the products' own quantize kernel runs only where no fused kernel makes
    the input (every o: attention's output)."""
    from tritonllm.runtimes.base import StepInput

    hf = load_hf(tiny_dir)
    cfg = EngineConfig(
        runtime="torch-cuda", max_slots=2, max_context=64, max_tokens_limit=32, default_max_tokens=8, quantization="fp8"
    )
    large = {(kind, 2048): "fp8" for kind in PROJECTIONS}
    prompts = [StepInput(0, [5, 6, 7, 8, 9, 10, 11], 0), StepInput(1, [12, 13, 14], 0)]
    runs, calls = [], []
    for fuse in (False, True):
        model = CausalLM(hf)
        quant.quantize_model(model, "fp8")
        rt = TorchCudaRuntime(
            None, cfg, model=model, device="cpu", triton_kernels=True, gemv_table={}, quant_table=large
        )
        rt.forward.fuse_row_quantization = fuse
        counted = qmatmul.quantize_rows
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(qmatmul, "quantize_rows", lambda *a: calls.append(fuse) or counted(*a))
            runs.append([rt.step(prompts), rt.step([StepInput(0, [3], 7), StepInput(1, [4], 3)])])
    for ref, got in zip(*runs):
        assert torch.equal(got, ref)
    layers = len(CausalLM(hf).layers)
    # per layer and step: 4 products rounding their input unfused; only o's fused
    assert calls.count(False) == 2 * 4 * layers and calls.count(True) == 2 * layers
