"""Half-precision ONNX export (the graph TensorRT's strongly typed networks need for fp16/bf16
plans): weights and KV tensors in the requested type, logits in float32, and on the tiny model the
fp16 graph's logits (run by ONNX Runtime on the CPU) match the fp32 graph's within 1 %."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tritonllm.build.onnx_export import example_inputs, export
from tritonllm.model.graph_io import OUTPUTS
from tritonllm.model.shape import ModelShape

ONNX_TYPES = {"float16": onnx.TensorProto.FLOAT16, "bfloat16": onnx.TensorProto.BFLOAT16}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_export_types(tiny_dir, tmp_path, dtype):
    path = export(tiny_dir, tmp_path / dtype, dtype=dtype)
    g = onnx.load(str(path)).graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.input) + list(g.output)}
    assert types["past_keys"] == types["new_values"] == ONNX_TYPES[dtype]
    assert types["logits"] == types["attn_bias"] == onnx.TensorProto.FLOAT
    weights = [t for t in g.initializer if len(t.dims) == 2]  # embeddings and projections
    assert weights and all(t.data_type == ONNX_TYPES[dtype] for t in weights)


def test_fp16_graph_matches_the_fp32_graph(tiny_dir, tiny_engine_dir, tmp_path):
    assert_fp16_graph_matches_fp32(tiny_dir, tiny_engine_dir, tmp_path)


def assert_fp16_graph_matches_fp32(checkpoint, fp32_dir, tmp_path, past: int = 5):
    """The fp16 export of `checkpoint` against its fp32 export in `fp32_dir`, on 12 new tokens after
    `past` cached ones: logits within 1 % of their scale, the same argmax."""
    path = export(checkpoint, tmp_path / "fp16", dtype="float16")
    shape = ModelShape.load(tmp_path / "fp16" / "model_shape.json")
    ids, pos, bias, last, pk, pv = example_inputs(shape, 2, 12, past, seed=3, dtype=torch.float16)
    feed = {
        "input_ids": ids.numpy(),
        "position_ids": pos.numpy(),
        "attn_bias": bias.numpy(),
        "last_index": last.numpy(),
        "past_keys": pk.numpy(),
        "past_values": pv.numpy(),
    }
    half = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(OUTPUTS, feed)
    feed32 = dict(feed, past_keys=pk.float().numpy(), past_values=pv.float().numpy())
    full = ort.InferenceSession(str(fp32_dir / "model.onnx"), providers=["CPUExecutionProvider"]).run(OUTPUTS, feed32)
    assert half[0].dtype == np.float32 and half[1].dtype == np.float16
    assert np.abs(half[0] - full[0]).max() <= 0.01 * np.abs(full[0]).max()
    assert (half[0].argmax(-1) == full[0].argmax(-1)).all()
