"""Q/DQ graphs for TensorRT: each projection's weight in the exported graph stored quantized with a
scale per output channel (the numbers `model.quant` gives the torch-cuda engine) and read through
a DequantizeLinear node, the explicit-quantization pattern TensorRT's builder turns into quantized
GEMMs. The embedding and the LM head stay as exported.

- `int8-wo`: int8 weights only; activations stay in the graph's precision.
- `int8` / `fp8`: int8 or float8 e4m3 weights, and each projection's input passes through
  QuantizeLinear -> DequantizeLinear with a static per-tensor scale from a calibration pass
  (`calibrate.py`), so the GEMM itself runs in 8 bits. FP8 types need opset 19."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np

from ..model.quant import STATIC
from ..model.shape import ModelShape
from .quantize_onnx import QUANT_FILE, write_scheme

log = logging.getLogger(__name__)
QDQ_SCHEMES = ("int8-wo", "int8", "fp8")
ACTIVATED = STATIC  # schemes that also quantize activations -> the format's largest value
FP8_OPSET = 19
PREFIX = "qdq-"
FORMAT = {
    "int8-wo": "Q/DQ: int8 weights, a float scale per output channel",
    "int8": "Q/DQ: int8 weights per output channel, int8 activations per tensor (static, calibrated)",
    "fp8": "Q/DQ: float8 e4m3 weights per output channel, float8 e4m3 activations per tensor (static, calibrated)",
}


def qdq_graph(onnx_dir: Path, scheme: str, prompts: list[list[int]] | None = None) -> Path:
    """`<onnx_dir>/qdq-<scheme>/model.onnx` from `<onnx_dir>/model.onnx`, redone when the export is
    newer or the calibration prompts changed. `prompts` (token ids) calibrate int8 / fp8."""
    import onnx
    import onnx.version_converter

    if scheme not in QDQ_SCHEMES:
        raise ValueError(f"quantization {scheme!r} has no Q/DQ export: use one of {', '.join(QDQ_SCHEMES)}")
    if scheme in ACTIVATED and not prompts:
        raise ValueError(f"quantization {scheme!r} on tensorrt needs calibration prompts for its activation scales")
    src, out = Path(onnx_dir) / "model.onnx", Path(onnx_dir) / f"{PREFIX}{scheme}"
    dst, digest = out / "model.onnx", _digest(prompts)
    if dst.exists() and dst.stat().st_mtime >= src.stat().st_mtime and _recorded_digest(out) == digest:
        return out
    model = onnx.load(str(src))
    if scheme == "fp8":  # ONNX's converter rewrites the ops whose form changed (ReduceMean's axes, ...)
        model = onnx.version_converter.convert_version(model, FP8_OPSET)
    shape = ModelShape.load(Path(onnx_dir) / "model_shape.json")
    targets = projection_nodes(model, shape.vocab_size)
    report = {"scheme": scheme, "format": FORMAT[scheme], "weights": len(targets), "calibration": digest}
    if scheme in ACTIVATED:
        absmax = _calibrate(src, model, shape, prompts, [node.input[0] for node, _ in targets])
        report["activation_absmax"] = {"min": min(absmax.values()), "max": max(absmax.values())}
        report["calibration_tokens"] = sum(len(p) for p in prompts)
    _rewrite(model, targets, scheme, absmax if scheme in ACTIVATED else {})
    onnx.checker.check_model(model)
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst), save_as_external_data=model.ByteSize() > 1.8e9)
    shutil.copy2(Path(onnx_dir) / "model_shape.json", out / "model_shape.json")
    write_scheme(out, report)
    log.info("      Q/DQ graph (%s, %d weights): %s", scheme, len(targets), dst)
    return out


def projection_nodes(model, vocab: int) -> list:
    """(MatMul node, weight initializer) of each decoder projection, in graph order (layer by
    layer, `model.quant.PROJECTIONS` within a layer); the LM head (N = vocab) is left out."""
    weights = {t.name: t for t in model.graph.initializer}
    found = []
    for node in model.graph.node:
        w = weights.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        if w is not None and len(w.dims) == 2 and w.dims[1] != vocab:
            found.append((node, w))
    return found


def activation_scales(graph_dir: Path) -> list[float]:
    """Each projection's static input scale in a calibrated Q/DQ graph, in graph order (layer by
    layer, `model.quant.PROJECTIONS` within one): the QuantizeLinear nodes' scales."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(Path(graph_dir) / "model.onnx"), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    quantizers = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    return [float(numpy_helper.to_array(inits[n.input[1]])) for n in quantizers]


def _rewrite(model, targets: list, scheme: str, absmax: dict[str, float]) -> None:
    from onnx import TensorProto, helper, numpy_helper

    before: dict[int, list] = {}  # id(MatMul) -> the nodes that feed it
    for node, w in targets:
        q, scale = quantize_columns(numpy_helper.to_array(w), "int8-wo" if scheme != "fp8" else "fp8")
        model.graph.initializer.remove(w)
        model.graph.initializer.extend([q_tensor(q, f"{w.name}_q"), numpy_helper.from_array(scale, f"{w.name}_scale")])
        feed = [helper.make_node("DequantizeLinear", [f"{w.name}_q", f"{w.name}_scale"], [f"{w.name}_dq"], axis=1)]
        node.input[1] = f"{w.name}_dq"
        if scheme in ACTIVATED:
            x = node.input[0]
            x_scale = np.array(max(absmax[x], 1e-12) / ACTIVATED[scheme], dtype=scale.dtype)
            zero = TensorProto.FLOAT8E4M3FN if scheme == "fp8" else TensorProto.INT8
            names = [f"{w.name}_x_scale", f"{w.name}_x_zero"]
            model.graph.initializer.extend(
                [numpy_helper.from_array(x_scale, names[0]), helper.make_tensor(names[1], zero, [], [0])]
            )
            feed.append(helper.make_node("QuantizeLinear", [x, *names], [f"{w.name}_xq"]))
            feed.append(helper.make_node("DequantizeLinear", [f"{w.name}_xq", *names], [f"{w.name}_xdq"]))
            node.input[0] = f"{w.name}_xdq"
        before[id(node)] = feed
    nodes = [n for node in model.graph.node for n in (*before.get(id(node), ()), node)]
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def quantize_columns(w: np.ndarray, scheme: str = "int8-wo") -> tuple[np.ndarray, np.ndarray]:
    """A MatMul weight [K, N] (x @ w) -> (quantized [K, N], scale [N] in w's dtype): per output
    channel, through `model.quant.quantize_weight` on its [N, K] transpose (the torch-cuda engine's
    numbers). fp8 comes back as a torch float8 tensor (numpy has no float8)."""
    import torch

    from ..model.quant import quantize_weight

    q, scale = quantize_weight(torch.from_numpy(np.ascontiguousarray(w.T.astype(np.float32))), scheme)
    q = q.T.contiguous()
    return (q if q.dtype == torch.float8_e4m3fn else q.numpy()), scale.numpy().astype(w.dtype)


def q_tensor(q, name: str):
    """An initializer of int8 (numpy) or float8 e4m3 (torch) values."""
    import torch
    from onnx import TensorProto, helper, numpy_helper

    if isinstance(q, np.ndarray):
        return numpy_helper.from_array(q, name)
    raw = q.view(torch.uint8).numpy().tobytes()
    return helper.make_tensor(name, TensorProto.FLOAT8E4M3FN, list(q.shape), raw, raw=True)


def _calibrate(src: Path, model, shape: ModelShape, prompts: list[list[int]], tensors: list[str]) -> dict[str, float]:
    from onnx.helper import tensor_dtype_to_np_dtype

    from ..model.graph_io import prefill_feed
    from .calibrate import input_absmax

    past = next(i for i in model.graph.input if i.name == "past_keys")
    kv = tensor_dtype_to_np_dtype(past.type.tensor_type.elem_type)
    feeds = [prefill_feed(p, shape.num_layers, shape.num_kv_heads, shape.head_dim, kv) for p in prompts]
    return input_absmax(src, feeds, tensors)


def _digest(prompts: list[list[int]] | None) -> str:
    if not prompts:
        return "none (weights' absmax)"
    raw = json.dumps(prompts).encode()
    return f"{len(prompts)} prompts, sha256 {hashlib.sha256(raw).hexdigest()[:16]}"


def _recorded_digest(out: Path) -> str | None:
    path = out / QUANT_FILE
    return json.loads(path.read_text()).get("calibration") if path.exists() else None
