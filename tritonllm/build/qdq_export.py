"""Weight-only Q/DQ graphs for TensorRT: each projection's weight in the exported graph stored as
int8 with a scale per output channel (the numbers `model.quant` gives the torch-cuda engine) and
read through a DequantizeLinear node, the explicit-quantization pattern TensorRT's builder turns
into quantized weights of a GEMM. The embedding and the LM head stay as exported.

Only int8 weight-only (`int8-wo`) is written: an FP8 GEMM in TensorRT also needs Q/DQ on the
activations with static scales, i.e. a calibration pass this build does not have yet."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from ..model.shape import ModelShape
from .quantize_onnx import write_scheme

log = logging.getLogger(__name__)
QDQ_SCHEMES = ("int8-wo",)
PREFIX = "qdq-"


def qdq_graph(onnx_dir: Path, scheme: str) -> Path:
    """`<onnx_dir>/qdq-<scheme>/model.onnx` from `<onnx_dir>/model.onnx` (redone when it is newer)."""
    import onnx
    from onnx import helper, numpy_helper

    if scheme not in QDQ_SCHEMES:
        raise ValueError(f"quantization {scheme!r} has no Q/DQ export: use one of {', '.join(QDQ_SCHEMES)}")
    src, out = Path(onnx_dir) / "model.onnx", Path(onnx_dir) / f"{PREFIX}{scheme}"
    dst = out / "model.onnx"
    if dst.exists() and dst.stat().st_mtime >= src.stat().st_mtime:
        return out
    model = onnx.load(str(src))
    vocab = ModelShape.load(Path(onnx_dir) / "model_shape.json").vocab_size
    weights = {t.name: t for t in model.graph.initializer}
    nodes, count = [], 0
    for node in model.graph.node:
        w = weights.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        if w is not None and len(w.dims) == 2 and w.dims[1] != vocab:  # a projection, not the LM head
            q, scale = quantize_columns(numpy_helper.to_array(w))
            model.graph.initializer.remove(w)
            model.graph.initializer.extend(
                [numpy_helper.from_array(q, f"{w.name}_q"), numpy_helper.from_array(scale, f"{w.name}_scale")]
            )
            nodes.append(
                helper.make_node("DequantizeLinear", [f"{w.name}_q", f"{w.name}_scale"], [f"{w.name}_dq"], axis=1)
            )
            node.input[1] = f"{w.name}_dq"
            count += 1
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model)
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst), save_as_external_data=model.ByteSize() > 1.8e9)
    shutil.copy2(Path(onnx_dir) / "model_shape.json", out / "model_shape.json")
    report = {"scheme": scheme, "format": "Q/DQ: int8 weights, a float scale per output channel", "weights": count}
    write_scheme(out, report)
    log.info("      Q/DQ graph (%s, %d weights): %s", scheme, count, dst)
    return out


def quantize_columns(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A MatMul weight [K, N] (x @ w) -> (int8 [K, N], scale [N] in w's dtype): per output channel,
    through `model.quant.quantize_weight` on its [N, K] transpose (the torch-cuda engine's numbers)."""
    import torch

    from ..model.quant import quantize_weight

    q, scale = quantize_weight(torch.from_numpy(np.ascontiguousarray(w.T.astype(np.float32))), "int8-wo")
    return np.ascontiguousarray(q.numpy().T), scale.numpy().astype(w.dtype)
