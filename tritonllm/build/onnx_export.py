"""Export a Llama-family HF checkpoint to ONNX with an explicit KV cache (the interface in
`tritonllm.model.graph_io`), and verify it against the HF model."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from ..model.graph_io import INPUTS, OUTPUTS, causal_bias
from ..model.modeling import CausalLM, load_hf
from ..model.shape import ModelShape

log = logging.getLogger(__name__)

EXPORT_VERSION = 3  # bump when the exported graph changes; cached exports are redone


def example_inputs(shape: ModelShape, b: int, t: int, p: int, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, shape.vocab_size, (b, t), generator=g)
    pos = (torch.arange(t) + p).repeat(b, 1)
    bias = torch.from_numpy(causal_bias(np.full(b, p), np.full(b, t), p, t))
    last = torch.full((b,), t - 1, dtype=torch.int64)
    kv = (shape.num_layers, b, shape.num_kv_heads, p, shape.head_dim)
    return ids, pos, bias, last, torch.randn(kv, generator=g, dtype=dtype), torch.randn(kv, generator=g, dtype=dtype)


TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def export(checkpoint: Path, out_dir: Path, opset: int = 17, dtype: str = "float32") -> Path:
    """`dtype`: weights and KV cache tensors of the graph (float16/bfloat16 for TensorRT plans,
    whose strongly typed networks take precision from the graph); logits stay float32."""
    out_dir.mkdir(parents=True, exist_ok=True)
    hf = load_hf(checkpoint, dtype=TORCH_DTYPES[dtype])
    model = CausalLM(hf).eval()
    model.shape.save(out_dir / "model_shape.json")
    onnx_path = out_dir / "model.onnx"
    t0 = time.time()
    dyn = {"input_ids": {0: "B", 1: "T"}, "position_ids": {0: "B", 1: "T"},
           "attn_bias": {0: "B", 2: "T", 3: "S"}, "last_index": {0: "B"},
           "past_keys": {1: "B", 3: "P"}, "past_values": {1: "B", 3: "P"},
           "logits": {0: "B"}, "new_keys": {1: "B", 3: "T"}, "new_values": {1: "B", 3: "T"}}
    with torch.no_grad():
        torch.onnx.export(model, example_inputs(model.shape, 2, 3, 4, dtype=TORCH_DTYPES[dtype]), str(onnx_path),
                          input_names=INPUTS,
                          output_names=OUTPUTS, dynamic_axes=dyn, opset_version=opset, dynamo=False,
                          external_data=model.shape.num_layers * model.shape.hidden_size ** 2 > 2e8)
    log.info("exported %s (%s) in %.1fs", onnx_path, dtype, time.time() - t0)
    return onnx_path


def verify(checkpoint: Path, out_dir: Path, tol: float = 2e-3) -> dict:
    """onnx checker + logits of the ONNX graph vs. the HF PyTorch model on the same inputs.

    Checks prefill (P=0) against HF directly, and a decode step with a real cache (prefill's new
    keys/values fed back as past). Passes when max |diff| <= tol * max |logit|."""
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(out_dir / "model.onnx"))
    hf = load_hf(checkpoint)
    shape = ModelShape.load(out_dir / "model_shape.json")
    sess = ort.InferenceSession(str(out_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    ids, pos, bias, last, pk, pv = example_inputs(shape, 1, 12, 0, seed=1)
    feed = {"input_ids": ids.numpy(), "position_ids": pos.numpy(), "attn_bias": bias.numpy(),
            "last_index": last.numpy(), "past_keys": pk.numpy(), "past_values": pv.numpy()}
    logits, nk, nv = sess.run(OUTPUTS, feed)
    with torch.no_grad():
        ref = hf(input_ids=torch.cat([ids, ids[:, :1]], 1)).logits.float().numpy()
    step = {"input_ids": ids[:, :1].numpy(), "position_ids": np.array([[12]]),
            "attn_bias": causal_bias(np.array([12]), np.array([1]), 12, 1), "last_index": np.array([0]),
            "past_keys": nk, "past_values": nv}
    logits2 = sess.run(OUTPUTS, step)[0]
    scale = float(np.abs(ref).max())
    report = {"prefill_max_abs_diff": float(np.abs(logits[0] - ref[0, 11]).max()),
              "decode_max_abs_diff": float(np.abs(logits2[0] - ref[0, 12]).max()),
              "max_abs_logit": scale, "tolerance": tol * scale,
              "argmax_equal": bool(logits[0].argmax() == ref[0, 11].argmax() and logits2[0].argmax() == ref[0, 12].argmax())}
    report["export_version"] = EXPORT_VERSION
    report["ok"] = max(report["prefill_max_abs_diff"], report["decode_max_abs_diff"]) <= tol * scale
    (out_dir / "verify.json").write_text(json.dumps(report, indent=1))
    if not report["ok"]:
        raise RuntimeError(f"ONNX logits differ from PyTorch beyond tolerance: {report}")
    return report

