"""TensorRT's calibrated Q/DQ graphs (int8 and fp8 weights and activations, static per-tensor
activation scales from the calibration pass) against an independent torch reference: the model's
own modules with the torch-cuda engine's quantized weights and each projection's input rounded
to the format with the scale the graph holds. ONNX Runtime runs the graphs with its Q/DQ fusion
off (the TensorRT stand-in's setting), so the graph's arithmetic is exactly what it says."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from tritonllm.build.calibrate import DEFAULT_TEXT, calibration_prompts
from tritonllm.build.pipeline import engine_files
from tritonllm.build.qdq_export import activation_scales
from tritonllm.build.quantize_onnx import QUANT_FILE, read_scheme
from tritonllm.config import EngineConfig
from tritonllm.model import quant
from tritonllm.model.graph_io import prefill_feed
from tritonllm.model.modeling import CausalLM, load_hf

from .test_engine_parity import PROMPTS

SCHEMES = ["int8", "fp8"]
CFG = EngineConfig(runtime="tensorrt", dtype="float32", max_slots=2, max_context=128, max_tokens_limit=64)


class RoundedInput(nn.Module):
    """A projection whose input is rounded to the scheme's format with a static scale first."""

    def __init__(self, linear: nn.Module, scale: float, scheme: str):
        super().__init__()
        self.linear, self.scale, self.scheme = linear, scale, scheme

    def forward(self, x):
        return self.linear(quant.round_activations(x, self.scale, self.scheme))


@pytest.fixture(scope="module")
def qdq_dirs(tiny_dir, tmp_path_factory):
    onnx_dir = tmp_path_factory.mktemp("qdq") / "onnx"
    return {s: engine_files(tiny_dir, "tiny", replace(CFG, quantization=s), onnx_dir) for s in SCHEMES}


def reference_model(tiny_dir, graph_dir, scheme):
    """CausalLM with the engine's quantized weights and the graph's activation scales, in the
    graph's order of projections (layer by layer, model.quant.PROJECTIONS within one)."""
    model = CausalLM(load_hf(tiny_dir)).eval()
    quant.quantize_model(model, "fp8" if scheme == "fp8" else "int8-wo")
    scales = activation_scales(graph_dir)
    assert len(scales) == len(model.layers) * len(quant.PROJECTIONS)
    for i, scale in enumerate(scales):
        layer, kind = model.layers[i // len(quant.PROJECTIONS)], quant.PROJECTIONS[i % len(quant.PROJECTIONS)]
        setattr(layer, kind, RoundedInput(getattr(layer, kind), scale, scheme))
    return model


@pytest.mark.parametrize("scheme", SCHEMES)
def test_calibrated_graph_quantizes_every_projection_input_and_weight(qdq_dirs, tiny_dir, scheme):
    import onnx

    graph = onnx.load(str(qdq_dirs[scheme] / "model.onnx")).graph
    ops = [n.op_type for n in graph.node]
    layers = load_hf(tiny_dir).config.num_hidden_layers
    assert ops.count("QuantizeLinear") == 4 * layers and ops.count("DequantizeLinear") == 8 * layers
    report = json.loads((qdq_dirs[scheme] / QUANT_FILE).read_text())
    assert read_scheme(qdq_dirs[scheme]) == scheme and report["calibration_tokens"] > 100
    assert 0 < report["activation_absmax"]["min"] <= report["activation_absmax"]["max"]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_calibrated_graph_computes_what_its_reference_does(qdq_dirs, tiny_dir, scheme):
    """Prefill logits and new keys of the Q/DQ graph (ONNX Runtime) = the rounded torch reference,
    and both differ from the unquantized model (the rounding is really there)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.disable_quant_qdq", "1")
    sess = ort.InferenceSession(str(qdq_dirs[scheme] / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    model = reference_model(tiny_dir, qdq_dirs[scheme], scheme)
    plain = CausalLM(load_hf(tiny_dir)).eval()
    ids = calibration_prompts(tiny_dir, PROMPTS[1] + " and then the story went on for a while.")[0]
    feed = prefill_feed(ids, model.shape.num_layers, model.shape.num_kv_heads, model.shape.head_dim, np.float32)
    got = sess.run(["logits", "new_keys"], feed)
    with torch.no_grad():
        args = [torch.from_numpy(v) for v in feed.values()]
        ref = [t.numpy() for t in model(*args)[:2]]
        unquantized = plain(*args)[0].numpy()
    np.testing.assert_allclose(got[0], ref[0], atol=2e-3, rtol=1e-3)
    np.testing.assert_allclose(got[1], ref[1], atol=2e-3, rtol=1e-3)
    assert np.abs(got[0] - unquantized).max() > 1e-3


def test_the_calibration_text_decides_the_scales_and_is_recorded(tiny_dir, tmp_path):
    """Other text, other activation ranges: the cached graph is redone, never reused silently."""
    from tritonllm.build.qdq_export import qdq_graph

    onnx_dir = engine_files(tiny_dir, "tiny", CFG, tmp_path / "onnx")
    first = qdq_graph(onnx_dir, "int8", calibration_prompts(tiny_dir, DEFAULT_TEXT))
    before = (first / QUANT_FILE).read_text()
    qdq_graph(onnx_dir, "int8", calibration_prompts(tiny_dir, "Short text.\n\nAnother paragraph, numbers 1 2 3."))
    assert (first / QUANT_FILE).read_text() != before
    with pytest.raises(ValueError, match="calibration prompts"):
        qdq_graph(onnx_dir, "fp8", None)
    with pytest.raises(ValueError, match="no paragraphs"):
        calibration_prompts(tiny_dir, "\n\n  \n\n")
