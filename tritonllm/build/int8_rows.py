"""The CPU engine's int8 graph (`--quantization int8` on onnxruntime): integer products with
activations quantized per row at run time.

Each MatMul of the fp32 export whose weight is a constant [K, N] becomes
  weight: int8 per output column (absmax / 127, `qdq_export.quantize_columns`);
  activation: each row (a token) rounded to uint8 with its own scale (absmax / 127, zero point
  128), by a few elementwise ops in the graph, once per activation however many products read it
  (q/k/v, gate/up);
  MatMulInteger (uint8 x int8, ONNX Runtime's VNNI kernel on x86) -> int32, times both scales.
ONNX Runtime's own dynamic quantization (`quantize_dynamic`) gives an activation one scale for the
whole tensor, which SmolLM2's outlier channels wreck; a scale per row keeps each token's range.
Its signed-activation form (int8 x int8) runs far slower here than uint8 x int8. With `absmax`
(each input's channel maxima from a calibration run), SmoothQuant moves activation range into the
weight first (x / s, W * s): the build smooths every decoder projection with alpha 0.5
(bench.onnx_quant_formats and bench.quant_eval measured the choices; docs/decisions.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .qdq_export import quantize_columns, smoothing

QMAX = 127.0


def matmul_int8_rows(src: Path, dst: Path, keep=lambda name: False, absmax: dict | None = None, alpha=0.5) -> int:
    """Writes `src` with its constant-weight MatMuls as per-row integer products to `dst` (one
    file); returns how many products were replaced. MatMuls whose node name `keep` accepts stay as
    they are. A weight another node also reads (a tied embedding) keeps its fp32 copy for that node."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    consts = [
        numpy_helper.from_array(np.array(QMAX, np.float32), "i8rows_qmax"),
        numpy_helper.from_array(np.array(1e-12, np.float32), "i8rows_eps"),
        numpy_helper.from_array(np.array(128.0, np.float32), "i8rows_zero_f"),
        numpy_helper.from_array(np.array(128, np.uint8), "i8rows_zero"),
    ]
    quantized: dict[str, tuple[str, str]] = {}  # activation -> (its uint8 rows, their scales)
    nodes, replaced = [], 0
    for node in graph.node:
        w = node.input[1] if node.op_type == "MatMul" and not keep(node.name) else None
        if w not in inits or len(inits[w].dims) != 2:
            nodes.append(node)
            continue
        x, y = node.input[0], node.output[0]
        weight = numpy_helper.to_array(inits[w]).astype(np.float32)
        if absmax is not None and x in absmax:
            smooth = smoothing(absmax[x], weight, alpha).astype(np.float32)
            weight = weight * smooth[:, None]
            consts.append(numpy_helper.from_array(1.0 / smooth, f"{w}_i8smooth"))
            nodes.append(helper.make_node("Mul", [x, f"{w}_i8smooth"], [f"{w}_i8x"]))
            x = f"{w}_i8x"
        if x not in quantized:
            quantized[x] = _row_quantize(x, nodes, helper, TensorProto)
        xq, xs = quantized[x]
        q, scale = quantize_columns(weight)
        consts += [numpy_helper.from_array(q, f"{w}_i8"), numpy_helper.from_array(scale, f"{w}_i8scale")]
        nodes += [
            helper.make_node("MatMulInteger", [xq, f"{w}_i8", "i8rows_zero"], [f"{y}_i32"]),
            helper.make_node("Cast", [f"{y}_i32"], [f"{y}_f"], to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"{y}_f", xs], [f"{y}_rows"]),
            helper.make_node("Mul", [f"{y}_rows", f"{w}_i8scale"], [y]),
        ]
        readers[w] -= 1
        replaced += 1
    kept = [i for i in graph.initializer if readers.get(i.name, 0) > 0]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + consts)
    onnx.save(model, str(dst))
    return replaced


def _row_quantize(x: str, nodes: list, helper, TensorProto) -> tuple[str, str]:
    """Appends the ops that round each row of `x` to uint8 (zero point 128) with scale absmax / 127;
    returns (the uint8 tensor, the scales [..., 1])."""
    p = f"{x}_i8rows"
    nodes += [
        helper.make_node("Abs", [x], [f"{p}_abs"]),
        helper.make_node("ReduceMax", [f"{p}_abs"], [f"{p}_max"], axes=[-1], keepdims=1),
        helper.make_node("Div", [f"{p}_max", "i8rows_qmax"], [f"{p}_s0"]),
        helper.make_node("Max", [f"{p}_s0", "i8rows_eps"], [f"{p}_scale"]),
        helper.make_node("Div", [x, f"{p}_scale"], [f"{p}_div"]),
        helper.make_node("Round", [f"{p}_div"], [f"{p}_round"]),
        helper.make_node("Add", [f"{p}_round", "i8rows_zero_f"], [f"{p}_shift"]),
        helper.make_node("Cast", [f"{p}_shift"], [f"{p}_u8"], to=TensorProto.UINT8),
    ]
    return f"{p}_u8", f"{p}_scale"
