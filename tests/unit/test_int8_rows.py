"""The CPU int8 graph (tritonllm/build/int8_rows.py) on a small hand-made graph run by ONNX
Runtime: products replaced, each activation quantized once, a tied weight kept for its other
reader, and outputs within int8 rounding of the fp32 graph, row by row (a row of large values
must not take the small rows' resolution)."""

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from tritonllm.build.int8_rows import matmul_int8_rows


def small_graph(path, rng):
    """x [rows, 16] -> q = x @ a, k = x @ b (one input, two products), out = q @ c; `a` is also
    read by a Gather (a tied embedding)."""
    shapes = {"a": (16, 16), "b": (16, 8), "c": (16, 4)}
    w = {n: (rng.standard_normal(s) * 0.3).astype(np.float32) for n, s in shapes.items()}
    nodes = [
        helper.make_node("MatMul", ["x", "a"], ["q"]),
        helper.make_node("MatMul", ["x", "b"], ["k"]),
        helper.make_node("MatMul", ["q", "c"], ["out"]),
        helper.make_node("Gather", ["a", "ids"], ["emb"]),
    ]
    graph = helper.make_graph(
        nodes,
        "small",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", 16]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [2]),
        ],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("out", "k", "emb")],
        [numpy_helper.from_array(v, n) for n, v in w.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x, "ids": np.array([0, 3])})


def test_int8_rows_graph_matches_fp32_within_rounding_per_row(tmp_path):
    rng = np.random.default_rng(0)
    small_graph(tmp_path / "fp32.onnx", rng)
    assert matmul_int8_rows(tmp_path / "fp32.onnx", tmp_path / "int8.onnx") == 3
    x = rng.standard_normal((5, 16)).astype(np.float32)
    x[2] *= 1000.0  # one token far larger than the rest: per-row scales keep the others exact enough
    (out, k, emb), (out_q, k_q, emb_q) = run(tmp_path / "fp32.onnx", x), run(tmp_path / "int8.onnx", x)
    for ref, got in ((out, out_q), (k, k_q)):
        err = np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)
        assert err.max() < 0.03, err
    np.testing.assert_array_equal(emb_q, emb)  # the Gather still reads the fp32 weight
    graph = onnx.load(str(tmp_path / "int8.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulInteger") == 3 and "MatMul" not in ops
    assert ops.count("ReduceMax") == 2  # x once for its two products, q once
    names = {i.name for i in graph.initializer}
    assert "a" in names and "b" not in names and "c" not in names  # only the tied weight keeps fp32


def test_smoothed_products_divide_the_input_and_keep_the_product(tmp_path):
    """With channel maxima (SmoothQuant): x / s feeds the row quantization, W * s the product; an
    input channel far larger than the rest no longer takes the row's resolution."""
    rng = np.random.default_rng(1)
    small_graph(tmp_path / "fp32.onnx", rng)
    x = rng.standard_normal((6, 16)).astype(np.float32)
    x[:, 5] *= 300.0  # an outlier channel, as post-norm activations have
    absmax = {"x": np.abs(x).max(0)}
    plain, smoothed = tmp_path / "plain.onnx", tmp_path / "smoothed.onnx"
    matmul_int8_rows(tmp_path / "fp32.onnx", plain)
    matmul_int8_rows(tmp_path / "fp32.onnx", smoothed, absmax=absmax, alpha=0.5)
    ops = [n.op_type for n in onnx.load(str(smoothed)).graph.node]
    assert ops.count("Mul") == 3 * 2 + 2  # two Muls per product, and x / s for each of x's two products
    ref = run(tmp_path / "fp32.onnx", x)[1]
    err = lambda path: float(np.linalg.norm(run(path, x)[1] - ref) / np.linalg.norm(ref))
    assert err(smoothed) < err(plain) / 2, (err(smoothed), err(plain))
