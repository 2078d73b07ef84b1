"""Are ONNX Runtime's 8-bit products faster than its fp32 ones on this CPU, by rows? A chain of 30
MLP-shaped products (SmolLM2-135M's 576 -> 1536 -> 576, 212 MB of fp32 weights: not cache-resident,
like the model's) as plain MatMul and as the MatMulNBits the CPU engine's int8 / int4 use, timed at
1, 8, 128 and 1,024 rows (a decode step at batch 1 and 8, a 128-token prompt, eight of them).

    python -m bench.ort_int8_kernels [--threads 2]

Prints a table and writes {date}-cpu-ort-int8-kernels.json/.md (command, machine, date, commit)."""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.measure import write_results
from bench.provenance import DEFAULT_OUT
from tritonllm.build.quantize_onnx import matmul_nbits

LAYERS, HIDDEN, INTER = 30, 576, 1536
ROWS = (1, 8, 128, 1024)


def mlp_chain(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, weights, x = [], [], "x"
    for i in range(LAYERS):
        for j, (k, n) in enumerate(((HIDDEN, INTER), (INTER, HIDDEN))):
            w = f"w{i}_{j}"
            weights.append(numpy_helper.from_array((rng.standard_normal((k, n)) * 0.04).astype(np.float32), w))
            nodes.append(helper.make_node("MatMul", [x, w], [f"y{i}_{j}"]))
            x = f"y{i}_{j}"
    graph = helper.make_graph(
        nodes,
        "mlp_chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", HIDDEN])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["m", HIDDEN])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what the installed runtime reads
    onnx.save(model, str(path))


def call_ms(path: Path, rows: int, threads: int) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((rows, HIDDEN), dtype=np.float32)
    session.run(None, {"x": x})
    reps = max(3, int(200 / rows))
    t0 = time.perf_counter()
    for _ in range(reps):
        session.run(None, {"x": x})
    return round(1e3 * (time.perf_counter() - t0) / reps, 2)


def main() -> None:
    import onnxruntime as ort

    logging.basicConfig(level=logging.WARNING)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default=DEFAULT_OUT)
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ort-int8-"))
    graphs = {"fp32 MatMul": work / "fp32.onnx"}
    mlp_chain(graphs["fp32 MatMul"])
    for bits, name in ((8, "int8"), (4, "int4")):
        graphs[f"MatMulNBits {bits}-bit, block 32, accuracy level 4 [{name}]"] = work / f"q{bits}.onnx"
        matmul_nbits(graphs["fp32 MatMul"], work / f"q{bits}.onnx", bits)
    rows, base = [], {}
    for name, path in graphs.items():
        times = {m: call_ms(path, m, a.threads) for m in ROWS}
        base = base or times
        row = {"graph": name, **{f"ms_{m}_rows": t for m, t in times.items()}}
        row["speedup_vs_fp32"] = " / ".join(f"{base[m] / times[m]:.2f}x" for m in ROWS)
        rows.append(row)
    cpu_flags = sorted({f for f in Path("/proc/cpuinfo").read_text().split() if f.startswith(("avx", "amx"))})
    facts = {
        "workload": f"{LAYERS} x (MatMul {HIDDEN}x{INTER}, {INTER}x{HIDDEN}), rows {list(ROWS)}, {a.threads} threads",
        "onnxruntime": ort.__version__,
        "cpu_flags": cpu_flags,
    }
    print(write_results(a.out, "ort-int8-kernels", facts, rows))


if __name__ == "__main__":
    main()
