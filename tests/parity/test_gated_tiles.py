"""The down product reading gate_up's product through the activation itself (`gemv.Gated`), on
Triton's interpreter: exactly the activation kernel's output times the weight (every tile form,
split input and output, SwiGLU and GeGLU), its refusals, the tuner's comparison with the
activation kernel + the fastest product, and a decode step on it giving the unfused step's logits."""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from tritonllm.config import EngineConfig
from tritonllm.model import quant
from tritonllm.model.modeling import CausalLM, load_hf
from tritonllm.runtimes.kernels import fused, gemv, gemv_tuning, qmatmul, timing
from tritonllm.runtimes.torch_cuda import TorchCudaRuntime
from tritonllm.runtimes.torch_cuda.tuning import PROJECTIONS

F, N = 96, 40  # the activation's width (the down product's K) and its output rows: interpreter-sized
PLAIN = [(4, 64, 4), (16, 32, 4, 2), (16, 32, 4, 2, 2), (16, 32, 4, 2, 1, 0, 1)]  # gemv, dot, split, swapped
FLOAT8 = [(16, 32, 4, 2, 1, 1), (16, 32, 4, 2, 2, 1, 1), (16, 32, 4, 2, 1, 0, 1)]  # float8 x float8, widened
HALF = torch.float16  # the activations here: the interpreter's bf16 tensor-core products and widening of
# float8 to bf16 are wrong (its float16 and float32 ones right); the GPU checks every tile against cuBLAS


def weight(fp8: bool):
    w = torch.randn(N, F)
    return quant.quantize_weight(w, "fp8") if fp8 else (w.to(HALF), None)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("config, fp8", [(c, False) for c in PLAIN] + [(c, True) for c in FLOAT8])
def test_a_gated_product_is_the_activation_kernels_output_times_the_weight(config, fp8, activation):
    """Bit for bit: the gated load rounds act(gate) * up to the activations' type as the activation kernel does, and
    the tile then multiplies the same values in the same order; 1 and 3 rows, plain and split."""
    torch.manual_seed(2)
    w, scale = weight(fp8)
    for rows in (1, 3):
        gate_up = torch.randn(rows, 1, 2 * F).to(HALF)
        act = fused.activate_mul(gate_up, activation)
        want = gemv.small_matmul(act, w, None, config, scale)
        got = gemv.small_matmul(gemv.Gated(gate_up, activation), w, None, config, scale)
        assert isinstance(got, gemv.SplitK) == isinstance(want, gemv.SplitK)
        tolerance = gemv.X8_TOLERANCE if len(config) >= 6 and config[5] else 2e-2  # the tuner's own check
        assert timing.agrees(str(config), lambda: gemv.dense(want), gemv.reference(act, w, None, scale), tolerance)
        assert torch.equal(gemv.dense(got), gemv.dense(want))


def test_gate_ups_split_partial_sums_are_added_up_as_they_load():
    """gate_up's own product split along K: the gated tile adds its partial sums, as the
    activation kernel would have."""
    torch.manual_seed(3)
    h, gu_w = torch.randn(2, 1, 64).to(HALF), torch.randn(2 * F, 64).to(HALF)
    parts = gemv.small_matmul(h, gu_w, None, (16, 32, 4, 2, 2))
    assert isinstance(parts, gemv.SplitK)
    w, _ = weight(False)
    want = gemv.small_matmul(fused.activate_mul(parts, "silu"), w, None, PLAIN[1])
    got = gemv.small_matmul(gemv.Gated(parts, "silu"), w, None, PLAIN[1])
    assert got.shape == want.shape == (2, 1, N) and torch.equal(got, want)


def test_a_gated_input_is_refused_where_it_cannot_be_made():
    w, scale = weight(True)
    gate_up = torch.randn(1, 1, 2 * F).to(HALF)
    with pytest.raises(ValueError, match="takes rows rounded per row; a gated input is not"):
        gemv.small_matmul(gemv.Gated(gate_up, "silu"), w, None, (16, 32, 4, 2, 1, 2, 0), scale)
    with pytest.raises(ValueError, match="activation 'gelu' is not a kernel form"):
        gemv.small_matmul(gemv.Gated(gate_up, "gelu"), w, None, PLAIN[1], scale)


def test_the_tuner_keeps_the_gated_tile_only_where_it_beats_the_activation_kernel_and_the_product(monkeypatch):
    """A fake clock: every product 2.0, the activation kernel 0.5, a gated product 2.2 (chosen: 2.2 <
    2.5) or 2.6 (not: the table keeps no gated key); the gated tries are the fastest plain tiles,
    never one that takes rows rounded per row, and they get `Gated` inputs."""
    torch.manual_seed(4)
    mats = [(w, None, s) for w, s in (weight(True) for _ in range(2))]
    seen = []
    real = gemv_tuning.small_matmul
    monkeypatch.setattr(gemv_tuning, "small_matmul", lambda x, *a: seen.append(type(x).__name__) or real(x, *a))
    acts = []
    spec = gemv_tuning.GatedKind("silu", lambda y, rounded: acts.append(rounded) or fused.activate_mul(y, "silu"))
    monkeypatch.setattr(gemv_tuning, "candidates", lambda *a: [PLAIN[1], FLOAT8[0], (16, 32, 4, 2, 1, 2, 0)])
    for gated_ms, chosen in ((2.2, True), (2.6, False)):
        clock = lambda fn: (seen.clear(), acts.clear(), fn(), 0.5 if acts else gated_ms if "Gated" in seen else 2.0)[3]
        monkeypatch.setattr(gemv_tuning, "graph_ms", clock)
        monkeypatch.setattr(qmatmul, "graph_ms", lambda fn: 9.0)  # the FP8 GEMM: never the fastest here
        rounded = frozenset({"down"})
        table, report = gemv_tuning.tune({"down": mats}, [1], {}, dtype=HALF, rounded=rounded, gated={"down": spec})
        entry = next(r for r in report if r["kind"] == "down+act")
        assert ("down+act", 1) in table if chosen else ("down+act", 1) not in table
        assert "(16, 32, 4, 2, 1, 2, 0)" not in entry["us"] and len(entry["us"]) == 1 + 2
        assert entry["chosen"] == (str(table[("down+act", 1)]) if chosen else next(iter(entry["us"])))


def test_a_decode_step_on_a_gated_down_product_gives_the_unfused_steps_logits(tiny_dir, monkeypatch):
    """Steps at 1-2 rows with every layer's down product gated (the same tile as the unfused run):
    the same logits, and no activation kernel in the decode steps."""
    from tritonllm.runtimes.base import StepInput

    hf = load_hf(tiny_dir)
    cfg = EngineConfig(
        runtime="torch-cuda", max_slots=2, max_context=64, max_tokens_limit=32, default_max_tokens=8, quantization="fp8"
    )
    plain = {(k, r): (32, 32, 4, 2) for k in PROJECTIONS for r in (1, 2)}
    gated = plain | {("down+act", r): (32, 32, 4, 2) for r in (1, 2)}
    large = {(kind, 2048): qmatmul.FP8 for kind in PROJECTIONS}
    runs, activations = [], []
    real = fused.activate_mul
    monkeypatch.setattr(fused, "activate_mul", lambda *a: activations.append(1) or real(*a))
    for table in (plain, gated):
        model = CausalLM(hf)
        quant.quantize_model(model, "fp8")
        rt = TorchCudaRuntime(
            None, cfg, model=model, device="cpu", triton_kernels=True, gemv_table=table, quant_table=large
        )
        rt.step([StepInput(0, [5, 6, 7, 8, 9], 0), StepInput(1, [12, 13, 14], 0)])
        activations.clear()
        runs.append([rt.step([StepInput(0, [3], 5), StepInput(1, [4], 3)]), rt.step([StepInput(0, [2], 6)])])
        runs[-1].append(len(activations))
    for got, ref in zip(runs[1][:2], runs[0][:2]):
        assert torch.equal(got, ref)
    assert runs[0][2] == 2 * len(CausalLM(hf).layers) and runs[1][2] == 0
