"""Float8 x float8 tiles for the large-batch table (`qmatmul.X8_TILES`, a 6th number: splits of K),
on Triton's interpreter: the product of exactly the rounded rows (the FP8 GEMM's on the same
input), split partial sums that add up to it, the tuner's plumbing (rounded rows for the kinds a
producer rounds, consumers and splits only at decode rows), and an engine whose every 8-bit
product is such a tile giving the FP8 GEMM's greedy ids."""

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
from tritonllm.runtimes.kernels import gemv, qmatmul
from tritonllm.runtimes.torch_cuda import TorchCudaRuntime
from tritonllm.runtimes.torch_cuda.tuning import PROJECTIONS
from tritonllm.text import TokenizerFiles

E4M3 = torch.float8_e4m3fn
# (rows of x, rows of W, K step, warps, stages, splits): interpreter-sized
TILES = [(16, 16, 32, 4, 2, 1), (32, 16, 32, 4, 2, 2), (16, 32, 64, 4, 2, 3)]


@pytest.mark.parametrize("config", TILES)
def test_a_float8_tile_multiplies_exactly_the_rounded_rows(config):
    """Rows of very different ranges, ragged M and N, a bias, unsplit and split: the product of the
    dequantized rows and weight, and the FP8 GEMM's on the same QuantRows."""
    torch.manual_seed(4)
    q, scale = quant.quantize_weight(torch.randn(40, 192), "fp8")
    x = torch.randn(37, 192) * torch.logspace(-2, 2, 37)[:, None]
    bias = torch.randn(40)
    rows = qmatmul.round_rows(x, E4M3)
    got = qmatmul.tile_matmul(rows, q, scale, bias, config)
    assert isinstance(got, gemv.SplitK) == (config[5] > 1)
    got = gemv.dense(got)
    exact = rows.q[:37].float() * rows.scale[:37]
    close = dict(atol=2e-3, rtol=1e-4)  # float32 sums in another order of terms up to ~300
    torch.testing.assert_close(got, gemv.reference(exact, q, bias, scale), **close)
    torch.testing.assert_close(got, qmatmul.fp8_matmul(rows, q, scale, bias), **close)
    # a tensor is rounded first, as its producer would have; the fast-accumulating GEMM agrees too
    torch.testing.assert_close(gemv.dense(qmatmul.matmul(x, q, scale, bias, config)), got)
    torch.testing.assert_close(qmatmul.matmul(rows, q, scale, bias, qmatmul.FP8_FAST), got, **close)


@pytest.mark.parametrize("config", TILES)
def test_an_int8_tile_multiplies_exactly_the_rows_rounded_to_int8(config):
    """An int8 weight (the LM head's format) times rows rounded to int8 per row: int32 sums, so the
    product equals the dequantized rows' and weight's up to float32 rounding of the scaling."""
    torch.manual_seed(5)
    q, scale = quant.quantize_weight(torch.randn(40, 192), "int8-wo")
    x = torch.randn(37, 192) * torch.logspace(-2, 2, 37)[:, None]
    rows = qmatmul.round_rows(x, torch.int8)
    assert rows.q.dtype == torch.int8 and int(rows.q.abs().max()) == 127
    want = torch.round(x / (x.abs().amax(1, keepdim=True) / 127))  # no value of randn lands on a half
    assert torch.equal(rows.q[:37].float(), want)
    got = gemv.dense(qmatmul.tile_matmul(x, q, scale, None, config))
    exact = rows.q[:37].float() * rows.scale[:37]
    torch.testing.assert_close(got, gemv.reference(exact, q, None, scale), atol=1e-4, rtol=1e-4)
    rel = (got - gemv.reference(x, q, None, scale)).norm() / got.norm()
    assert rel < 1e-2  # the rows' own rounding: 8 bits a value, against the unrounded rows


def test_an_8bit_tile_refuses_rows_rounded_to_another_type():
    q, scale = quant.quantize_weight(torch.randn(16, 64), "int8-wo")
    with pytest.raises(ValueError, match="round x to its type"):
        qmatmul.tile_matmul(qmatmul.round_rows(torch.randn(3, 64), E4M3), q, scale, None, TILES[0])


def test_a_widening_tile_refuses_rounded_rows():
    q, scale = quant.quantize_weight(torch.randn(16, 64), "fp8")
    with pytest.raises(ValueError, match="takes a tensor, not QuantRows"):
        qmatmul.tile_matmul(qmatmul.round_rows(torch.randn(3, 64), E4M3), q, scale, None, (16, 16, 32, 4, 2))


def test_candidates_split_only_where_the_consumer_adds_partial_sums():
    fp8 = quant.quantize_weight(torch.randn(64, 512), "fp8")[0]
    int8 = quant.quantize_weight(torch.randn(64, 512), "int8-wo")[0]
    assert qmatmul.candidates(int8, True) == list(qmatmul.TILE_CONFIGS)
    with_rows = qmatmul.candidates(int8, False, int8_rows=True)  # the int8 head beside fp8 projections
    assert with_rows[: len(qmatmul.TILE_CONFIGS)] == list(qmatmul.TILE_CONFIGS)
    assert {c for c in with_rows if qmatmul.takes_rounded(c)} == {(*t, 1) for t in qmatmul.X8_TILES}
    split = qmatmul.candidates(fp8, True)
    assert {qmatmul.FP8, qmatmul.FP8_FAST} <= set(split) and all(qmatmul.takes_rounded(c) for c in split)
    assert {c[5] for c in split if isinstance(c, tuple)} == {1, 2, 4}
    assert {c[5] for c in qmatmul.candidates(fp8, False) if isinstance(c, tuple)} == {1}
    short = quant.quantize_weight(torch.randn(64, 256), "fp8")[0]  # 4 slices of 128 would not fit
    assert {c[5] for c in qmatmul.candidates(short, True) if isinstance(c, tuple)} == {1, 2}
    assert not qmatmul.takes_rounded("reference") and not qmatmul.takes_rounded(qmatmul.TILE_CONFIGS[0])


def test_the_tuner_times_rounded_rows_consumers_and_splits_where_they_apply(monkeypatch):
    """Kinds a producer rounds get QuantRows, "o" a tensor; decode rows run the consumer (which sees
    the split partial sums) and try splits, prefill rows neither; the fastest timing is chosen."""
    monkeypatch.setattr(qmatmul, "X8_TILES", ((16, 16, 32, 4, 2),))
    monkeypatch.setattr(qmatmul, "X8_SPLITS", (1, 2))
    seen, consumed = [], []
    real = qmatmul.matmul

    def spy(x, w, s, b, choice):
        seen.append((choice, type(x).__name__, x.rows if isinstance(x, qmatmul.QuantRows) else x.shape[0]))
        return real(x, w, s, b, choice)

    monkeypatch.setattr(qmatmul, "matmul", spy)
    prefer = (16, 16, 32, 4, 2, 2)  # the fake clock's favourite where it is offered
    monkeypatch.setattr(qmatmul, "graph_ms", lambda fn: (fn(), 1.0 if seen[-1][0] == prefer else 2.0)[1])
    torch.manual_seed(1)
    mats = [(w, None, s) for w, s in (quant.quantize_weight(torch.randn(32, 256), "fp8") for _ in range(2))]
    consumer = lambda y: consumed.append(type(y).__name__)
    tune = lambda kind: qmatmul.tune({kind: mats}, [20, 40], torch.float32, {kind: consumer}, 20, frozenset({"down"}))
    table, report = tune("down")
    assert table[("down", 20)] == prefer and table[("down", 40)] != prefer  # prefill rows: no split offered
    assert "SplitK" in consumed and len(report) == 2 and all(r["us"]["reference"] for r in report)
    assert {t for c, t, _ in seen if qmatmul.takes_rounded(c)} == {"QuantRows"}  # rounded by its producer
    seen.clear()
    assert tune("o")[0][("o", 20)] == prefer
    assert {t for c, t, _ in seen if qmatmul.takes_rounded(c)} == {"Tensor"}  # attention's output: rounded inside


def test_an_engine_on_float8_tiles_gives_the_fp8_gemm_ids(tiny_dir):
    """Every 8-bit product (prefill and decode: no small-batch table) a split float8 tile, fed rows
    its producers rounded; the ids equal the same engine on the FP8 GEMM."""
    from .test_engine_parity import PROMPTS

    hf, tok = load_hf(tiny_dir), TokenizerFiles(tiny_dir)
    prompts = [tok.encode(p) for p in PROMPTS[:2]]
    cfg = EngineConfig(runtime="torch-cuda", max_slots=2, max_context=160, max_tokens_limit=64, quantization="fp8")
    runs = []
    for choice in (qmatmul.FP8, (16, 16, 32, 4, 2, 2)):
        model = CausalLM(hf)
        quant.quantize_model(model, "fp8")
        large = {(kind, 2048): choice for kind in PROJECTIONS}
        runtime = TorchCudaRuntime(
            None, cfg, model=model, device="cpu", triton_kernels=True, gemv_table={}, quant_table=large
        )
        with InProcessEngine(None, cfg, runtime=runtime) as eng:
            seqs = [eng.submit(ids, max_tokens=n, temperature=0.0, ignore_eos=True) for ids, n in zip(prompts, [5, 3])]
            runs.append([s.wait(300).ids for s in seqs])
    assert runs[0] == runs[1]


def test_an_int8_head_on_int8_rows_beside_fp8_projections(tiny_dir):
    """The int8 LM head beside fp8 projections as an int8 x int8 tile at every row count: the engine's
    greedy ids (prefill and decode: no small-batch table) equal those of the same engine with the
    head dequantized: the rounding of its input to int8 per row moves no argmax here."""
    from .test_engine_parity import PROMPTS

    hf, tok = load_hf(tiny_dir), TokenizerFiles(tiny_dir)
    prompt = tok.encode(PROMPTS[0])
    fp8 = EngineConfig(runtime="torch-cuda", max_slots=2, max_context=160, max_tokens_limit=64, quantization="fp8")
    cfg = replace(fp8, quantize_lm_head=True)
    runs = []
    for head in ("reference", (16, 512, 64, 4, 2, 1)):  # wide tiles: few programs for the interpreter
        model = CausalLM(hf)
        quant.quantize_model(model, "fp8")
        quant.quantize_head(model)
        table = {("lm_head", 2048): head, **{(kind, 2048): qmatmul.FP8 for kind in PROJECTIONS}}
        runtime = TorchCudaRuntime(
            None, cfg, model=model, device="cpu", triton_kernels=True, gemv_table={}, quant_table=table
        )
        with InProcessEngine(None, cfg, runtime=runtime) as eng:
            runs.append(eng.submit(prompt, max_tokens=4, temperature=0.0, ignore_eos=True).wait(300).ids)
    assert runs[0] == runs[1]
