"""TensorRT's calibrated Q/DQ graphs (int8 and fp8 weights and activations, SmoothQuant divisors
and static per-tensor activation scales from the calibration pass) against an independent torch
reference: the model's own modules with the smoothed weights quantized as the torch-cuda engine
quantizes, and each projection's input divided and rounded with the graph's numbers
(`model.quant.static_reference`). ONNX Runtime runs the graphs with its Q/DQ fusion off (the
TensorRT stand-in's setting), so the graph's arithmetic is exactly what it says."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from tritonllm.build.calibrate import DEFAULT_TEXT, calibration_prompts
from tritonllm.build.pipeline import engine_files
from tritonllm.build.qdq_export import WEIGHT_ONLY, activation_scales
from tritonllm.build.quantize_onnx import QUANT_FILE, read_scheme
from tritonllm.config import EngineConfig
from tritonllm.model import quant
from tritonllm.model.graph_io import prefill_feed
from tritonllm.model.modeling import CausalLM, load_hf

from .test_engine_parity import PROMPTS

SCHEMES = ["int8", "fp8"]
CFG = EngineConfig(runtime="tensorrt", dtype="float32", max_slots=2, max_context=128, max_tokens_limit=64)


@pytest.fixture(scope="module")
def qdq_dirs(tiny_dir, tmp_path_factory):
    onnx_dir = tmp_path_factory.mktemp("qdq") / "onnx"
    return {s: engine_files(tiny_dir, "tiny", replace(CFG, quantization=s), onnx_dir) for s in SCHEMES}


def reference_model(tiny_dir, graph_dir, scheme):
    """CausalLM as the graph's scheme computes it, with the graph's smoothing and scales."""
    return quant.static_reference(CausalLM(load_hf(tiny_dir)).eval(), activation_scales(graph_dir), scheme)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_calibrated_graph_quantizes_every_projection_input_and_weight(qdq_dirs, tiny_dir, scheme):
    import onnx

    graph = onnx.load(str(qdq_dirs[scheme] / "model.onnx")).graph
    ops = [n.op_type for n in graph.node]
    layers = load_hf(tiny_dir).config.num_hidden_layers
    quantized = layers * (len(quant.PROJECTIONS) - len(WEIGHT_ONLY[scheme]))  # int8's down stays weight-only
    assert ops.count("QuantizeLinear") == quantized and ops.count("DequantizeLinear") == 4 * layers + quantized
    assert ops.count("Div") >= quantized  # the SmoothQuant divisors (attention has its own Div)
    inputs = activation_scales(qdq_dirs[scheme])
    assert [x is None for x in inputs] == [k in WEIGHT_ONLY[scheme] for _ in range(layers) for k in quant.PROJECTIONS]
    divisors = [x[1] for x in inputs if x is not None]
    assert all((d > 0).all() for d in divisors) and any(d.max() / d.min() > 2 for d in divisors)
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
    for a, b in zip(got, ref):  # an input exactly between two steps may round the other way: rare, one step
        diff = np.abs(a - b)
        assert (diff > 2e-3).mean() < 0.01 and diff.max() < 2e-2, (diff.max(), (diff > 2e-3).mean())
    assert np.abs(got[0] - unquantized).max() > 1e-3


def test_the_calibration_text_decides_the_scales_and_is_recorded(tiny_dir, tmp_path):
    """Other text, other activation ranges: the cached graph is redone, never reused silently."""
    from tritonllm.build.qdq_export import qdq_graph

    onnx_dir = engine_files(tiny_dir, "tiny", CFG, tmp_path / "onnx")
    first = qdq_graph(onnx_dir, "int8", calibration_prompts(tiny_dir, DEFAULT_TEXT))
    before = (first / QUANT_FILE).read_text()
    qdq_graph(onnx_dir, "int8", calibration_prompts(tiny_dir, "Short text.\n\nAnother paragraph, numbers 1 2 3."))
    assert (first / QUANT_FILE).read_text() != before
    report = json.loads((first / QUANT_FILE).read_text())
    (first / QUANT_FILE).write_text(json.dumps({**report, "format": "an older Q/DQ layout"}))
    qdq_graph(onnx_dir, "int8", calibration_prompts(tiny_dir, "Short text.\n\nAnother paragraph, numbers 1 2 3."))
    assert json.loads((first / QUANT_FILE).read_text()) == report  # made again, not reused
    with pytest.raises(ValueError, match="calibration prompts"):
        qdq_graph(onnx_dir, "fp8", None)
    with pytest.raises(ValueError, match="no paragraphs"):
        calibration_prompts(tiny_dir, "\n\n  \n\n")
