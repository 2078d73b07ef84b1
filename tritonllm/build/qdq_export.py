"""Q/DQ graphs for TensorRT: each projection's weight in the exported graph stored quantized with a
scale per output channel (the numbers `model.quant` gives the torch-cuda engine) and read through
a DequantizeLinear node, the explicit-quantization pattern TensorRT's builder turns into quantized
GEMMs. The embedding and the LM head stay as exported.

- `int8-wo`: int8 weights only; activations stay in the graph's precision.
- `int8` / `fp8`: int8 or float8 e4m3 weights, and each projection's input passes through
  QuantizeLinear -> DequantizeLinear with a static per-tensor scale from a calibration pass
  (`calibrate.py`), so the GEMM itself runs in 8 bits. FP8 types need opset 19.

A handful of input channels of an LLM's projections run tens of times larger than the rest, and one
scale per tensor spends the 8 bits on them. SmoothQuant (Xiao et al., 2022) moves that range into
the weights: input channel k is divided by s_k = a_k^alpha / w_k^(1-alpha) (a_k: its calibrated
absmax, w_k: the largest weight it multiplies) through a Div before the QuantizeLinear, and the
weight's row k multiplied by s_k before it is quantized: the product is unchanged, the ranges even.
Where even that is not enough (int8's down projection), the input stays unquantized."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np

from ..model.quant import STATIC
from ..model.shape import ModelShape
from .quantize_onnx import report_of, write_scheme

log = logging.getLogger(__name__)
QDQ_SCHEMES = ("int8-wo", "int8", "fp8")
ACTIVATED = STATIC  # schemes that also quantize activations -> (format, largest value)
SMOOTHING = {"int8": 0.5, "fp8": 0.3}  # SmoothQuant's alpha per scheme (docs/decisions.md: measured)
# projections whose input keeps the graph's precision (their weights are still 8-bit): the MLP's
# down projection reads act(gate) * up, whose outliers no single int8 scale per tensor survives
WEIGHT_ONLY = {"int8": ("down",), "fp8": ()}
FP8_OPSET = 19
PREFIX = "qdq-"
FORMAT = {  # recorded with each graph: a cached graph of another format is made again
    "int8-wo": "Q/DQ: int8 weights, a float scale per output channel",
    **{
        scheme: f"Q/DQ: {kind} weights per output channel, {kind} activations per tensor (static, calibrated, "
        f"SmoothQuant alpha {SMOOTHING[scheme]}), weight-only: {', '.join(WEIGHT_ONLY[scheme]) or 'none'}"
        for scheme, kind in (("int8", "int8"), ("fp8", "float8 e4m3"))
    },
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
    dst, calibration = out / "model.onnx", digest(prompts)
    made, fresh = report_of(out), dst.exists() and dst.stat().st_mtime >= src.stat().st_mtime
    if fresh and (made.get("format"), made.get("calibration")) == (FORMAT[scheme], calibration):
        return out  # a graph of another format or calibration is made again, never reused
    model = onnx.load(str(src))
    if scheme == "fp8":  # ONNX's converter rewrites the ops whose form changed (ReduceMean's axes, ...)
        model = onnx.version_converter.convert_version(model, FP8_OPSET)
    shape = ModelShape.load(Path(onnx_dir) / "model_shape.json")
    targets = projection_nodes(model, shape.vocab_size)
    report = {"scheme": scheme, "format": FORMAT[scheme], "weights": len(targets), "calibration": calibration}
    absmax = {}
    if scheme in ACTIVATED:
        absmax = _calibrate(src, model, shape, prompts, [node.input[0] for node, _ in targets])
        peaks = [float(a.max()) for a in absmax.values()]
        report.update(activation_absmax={"min": min(peaks), "max": max(peaks)}, smoothquant_alpha=SMOOTHING[scheme])
        report["calibration_tokens"] = sum(len(p) for p in prompts)
    _rewrite(model, targets, scheme, absmax)
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


def activation_scales(graph_dir: Path) -> list[tuple[float, np.ndarray] | None]:
    """(static input scale, SmoothQuant divisor s per input channel) of each projection of a Q/DQ
    graph, None where its input is not quantized, in graph order (layer by layer,
    `model.quant.PROJECTIONS` within one)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(Path(graph_dir) / "model.onnx"), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    value = lambda name: numpy_helper.to_array(inits[name])
    made = {out: n for n in model.graph.node for out in n.output}
    found = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or not node.input[1].endswith("_dq"):
            continue  # not a projection: attention's products, the LM head
        dq = made.get(node.input[0])
        if dq is None or dq.op_type != "DequantizeLinear":
            found.append(None)
            continue
        div = made[made[dq.input[0]].input[0]]  # DequantizeLinear <- QuantizeLinear <- Div
        found.append((float(value(dq.input[1])), value(div.input[1])))
    return found


def _rewrite(model, targets: list, scheme: str, absmax: dict[str, np.ndarray]) -> None:
    from onnx import numpy_helper

    from ..model.quant import PROJECTIONS

    before: dict[int, list] = {}  # id(MatMul) -> the nodes that feed it
    for i, (node, w) in enumerate(targets):
        weight = numpy_helper.to_array(w)
        feed = []
        if scheme in ACTIVATED and PROJECTIONS[i % len(PROJECTIONS)] not in WEIGHT_ONLY[scheme]:
            smooth = smoothing(absmax[node.input[0]], weight, SMOOTHING[scheme]).astype(weight.dtype)
            weight = weight * smooth[:, None]
            feed = _quantized_input(model, node, w.name, absmax[node.input[0]] / smooth, smooth, scheme, weight.dtype)
        q, scale = quantize_columns(weight, "int8-wo" if scheme != "fp8" else "fp8")
        model.graph.initializer.remove(w)
        model.graph.initializer.extend([q_tensor(q, f"{w.name}_q"), numpy_helper.from_array(scale, f"{w.name}_scale")])
        feed.append(_node("DequantizeLinear", [f"{w.name}_q", f"{w.name}_scale"], f"{w.name}_dq", axis=1))
        node.input[1] = f"{w.name}_dq"
        before[id(node)] = feed
    nodes = [n for node in model.graph.node for n in (*before.get(id(node), ()), node)]
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def smoothing(act_absmax: np.ndarray, weight: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's s_k = a_k^alpha / w_k^(1-alpha) for a MatMul weight [K, N] (1 where a channel
    never carried a value or has no weight)."""
    a = act_absmax.astype(np.float64)
    w = np.abs(weight).max(axis=1).astype(np.float64)
    s = np.ones_like(a)
    live = (a > 0) & (w > 0)
    s[live] = a[live] ** alpha / w[live] ** (1 - alpha)
    return np.clip(s, 1e-5, 1e5)


def _quantized_input(model, node, name: str, absmax: np.ndarray, smooth: np.ndarray, scheme: str, dtype) -> list:
    """x -> x / s -> QuantizeLinear -> DequantizeLinear -> the MatMul's input, one static scale."""
    from onnx import TensorProto, helper, numpy_helper

    x_scale = np.array(max(float(absmax.max()), 1e-12) / ACTIVATED[scheme][1], dtype=dtype)  # of x / s
    zero = TensorProto.FLOAT8E4M3FN if scheme == "fp8" else TensorProto.INT8
    names = [f"{name}_x_scale", f"{name}_x_zero"]
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(smooth, f"{name}_x_smooth"),
            numpy_helper.from_array(x_scale, names[0]),
            helper.make_tensor(names[1], zero, [], [0]),
        ]
    )
    x, node.input[0] = node.input[0], f"{name}_xdq"
    return [
        _node("Div", [x, f"{name}_x_smooth"], f"{name}_xs"),
        _node("QuantizeLinear", [f"{name}_xs", *names], f"{name}_xq"),
        _node("DequantizeLinear", [f"{name}_xq", *names], f"{name}_xdq"),
    ]


def _node(op: str, inputs: list[str], output: str, **attrs):
    from onnx import helper

    return helper.make_node(op, inputs, [output], **attrs)


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


def projection_absmax(src: Path, shape: ModelShape, prompts: list[list[int]]) -> dict[str, np.ndarray]:
    """{input tensor: channel absmax} of each decoder projection of the graph at `src` (LM head
    left out), over prefills of `prompts`."""
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    return _calibrate(src, model, shape, prompts, [n.input[0] for n, _ in projection_nodes(model, shape.vocab_size)])


def _calibrate(src: Path, model, shape: ModelShape, prompts: list[list[int]], tensors: list[str]) -> dict:
    from onnx.helper import tensor_dtype_to_np_dtype

    from ..model.graph_io import prefill_feed
    from .calibrate import channel_absmax

    past = next(i for i in model.graph.input if i.name == "past_keys")
    kv = tensor_dtype_to_np_dtype(past.type.tensor_type.elem_type)
    feeds = [prefill_feed(p, shape.num_layers, shape.num_kv_heads, shape.head_dim, kv) for p in prompts]
    return channel_absmax(src, feeds, tensors)


def digest(prompts: list[list[int]] | None) -> str:
    if not prompts:
        return "none (weights' absmax)"
    raw = json.dumps(prompts).encode()
    return f"{len(prompts)} prompts, sha256 {hashlib.sha256(raw).hexdigest()[:16]}"
