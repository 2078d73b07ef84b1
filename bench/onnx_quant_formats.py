"""Which of ONNX Runtime's quantized formats the CPU engine's int8 / int4 use: accuracy and speed of
each on SmolLM2-135M, side by side in one run.

    python -m bench.onnx_quant_formats

Accuracy: mean KL(fp32 || format) and top-1 agreement of the next-token distributions at 3
positions of 8 rows of real text (bench.quant_eval's); speed: the graph's call time at decode
batch 1 and 8 (past 160) and a 128-token prefill. Prints a table and writes
{date}-cpu-onnx-quant-formats.json/.md."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from bench.measure import write_results
from bench.provenance import DEFAULT_OUT
from bench.quant_eval import kjv_verses, log_probs
from bench.workloads import smollm2_onnx
from tritonllm.build.int8_rows import matmul_int8_rows
from tritonllm.build.quantize_onnx import matmul_nbits
from tritonllm.model.graph_io import OUTPUTS, causal_bias
from tritonllm.model.shape import ModelShape
from tritonllm.text import TokenizerFiles

log = logging.getLogger("bench.onnx_quant_formats")


def dynamic_int8(src: Path, dst: Path, exclude: list[str], reduce_range: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        src,
        dst,
        op_types_to_quantize=["MatMul"],
        per_channel=True,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=exclude,
        reduce_range=reduce_range,
        extra_options={"MatMulConstBOnly": True},
    )


def feed(shape: ModelShape, ids: np.ndarray, past: int) -> dict:
    b, t = ids.shape
    kv = np.random.default_rng(0).standard_normal(
        (shape.num_layers, b, shape.num_kv_heads, past, shape.head_dim), dtype=np.float32
    )
    return {
        "input_ids": ids,
        "position_ids": (np.arange(t) + past)[None].repeat(b, 0),
        "attn_bias": causal_bias(np.full(b, past), np.full(b, t), past, t),
        "last_index": np.full(b, t - 1, np.int64),
        "past_keys": kv,
        "past_values": kv.copy(),
    }


def rows_then_nbits(src: Path, dst: Path, keep, **smooth) -> None:
    """int8 rows for every product but those `keep` accepts, which go to MatMulNBits 8-bit."""
    matmul_int8_rows(src, dst, keep=keep, **smooth)
    matmul_nbits(dst, dst, 8)


def call_ms(session, inputs: dict, reps: int) -> float:
    session.run(OUTPUTS, inputs)
    t0 = time.perf_counter()
    for _ in range(reps):
        session.run(OUTPUTS, inputs)
    return round(1e3 * (time.perf_counter() - t0) / reps, 1)


def main() -> None:
    import onnx
    import onnxruntime as ort

    logging.basicConfig(level=logging.WARNING)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("build/onnx/smollm2-formats"))
    p.add_argument("--formats", nargs="*", help="only the formats whose name contains one of these")
    p.add_argument("--out", default=DEFAULT_OUT)
    a = p.parse_args()
    ckpt, onnx_dir = smollm2_onnx()
    src, shape = onnx_dir / "model.onnx", ModelShape.load(onnx_dir / "model_shape.json")
    a.work.mkdir(parents=True, exist_ok=True)
    graph = onnx.load(str(src), load_external_data=False)
    down = [n.name for n in graph.graph.node if n.op_type == "MatMul" and n.name.startswith("/down")]
    is_down = set(down).__contains__
    lm_head = [n.name for n in graph.graph.node if n.op_type == "MatMul"][-1]  # the last product
    memo = {}

    def calibrated():
        if not memo:
            from tritonllm.build.calibrate import calibration_prompts
            from tritonllm.build.qdq_export import projection_absmax

            memo.update(projection_absmax(src, shape, calibration_prompts(ckpt)))
        return memo

    makers = {
        "dynamic int8 (QOperator, per-tensor activations)": lambda d: dynamic_int8(src, d, [], False),
        "dynamic int8, 7-bit weights (reduce_range)": lambda d: dynamic_int8(src, d, [], True),
        "dynamic int8, 7-bit weights, down_proj fp32": lambda d: dynamic_int8(src, d, down, True),
        "int8 rows (MatMulInteger u8 x s8, a scale per activation row) [int8]": lambda d: matmul_int8_rows(src, d),
        "int8 rows, SmoothQuant 0.5": lambda d: matmul_int8_rows(src, d, absmax=calibrated(), alpha=0.5),
        "int8 rows, SmoothQuant 0.8": lambda d: matmul_int8_rows(src, d, absmax=calibrated(), alpha=0.8),
        "int8 rows, SmoothQuant 0.3": lambda d: matmul_int8_rows(src, d, absmax=calibrated(), alpha=0.3),
        "int8 rows, SmoothQuant 0.5, o and down_proj MatMulNBits 8-bit": lambda d: rows_then_nbits(
            src, d, lambda n: is_down(n) or n.startswith("/o"), absmax=calibrated(), alpha=0.5
        ),
        "int8 rows, SmoothQuant 0.5, down_proj MatMulNBits 8-bit": lambda d: rows_then_nbits(
            src, d, is_down, absmax=calibrated(), alpha=0.5
        ),
        "int8 rows, down_proj fp32": lambda d: matmul_int8_rows(src, d, keep=is_down),
        "int8 rows, down_proj MatMulNBits 8-bit": lambda d: rows_then_nbits(src, d, is_down),
        "int8 rows, LM head fp32": lambda d: matmul_int8_rows(src, d, keep=lambda n: n == lm_head),
        "MatMulNBits 8-bit block 32, acc 4": lambda d: matmul_nbits(src, d, 8),
        "MatMulNBits 8-bit block 128, acc 4": lambda d: matmul_nbits(src, d, 8, block=128),
        "MatMulNBits 8-bit block 128, fp32 compute": lambda d: matmul_nbits(src, d, 8, block=128, accuracy_level=None),
        "MatMulNBits 4-bit block 32, acc 4 [int4]": lambda d: matmul_nbits(src, d, 4),
        "MatMulNBits 4-bit block 32, fp32 compute": lambda d: matmul_nbits(src, d, 4, accuracy_level=None),
    }
    if a.formats:
        makers = {k: v for k, v in makers.items() if any(f in k for f in a.formats)}
    tok = TokenizerFiles(ckpt)
    text = np.array(tok.encode(" ".join(kjv_verses()[:400]), add_special_tokens=False)[: 8 * 96]).reshape(8, 96)
    rng = np.random.default_rng(1)
    speed_inputs = {
        f"b{b}_t{t}_ms": feed(shape, rng.integers(0, shape.vocab_size, (b, t)), p)
        for b, t, p in ((1, 1, 160), (8, 1, 160), (1, 128, 0))
    }
    rows, ref = [], None
    for name, make in {"fp32": None, **makers}.items():
        path = src if make is None else a.work / f"{len(rows)}.onnx"
        if make is not None:
            make(path)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        lp = np.concatenate(
            [log_probs(session.run(OUTPUTS, feed(shape, text[:, : last + 1], 0))[0]) for last in (31, 63, 95)]
        )
        ref = lp if ref is None else ref
        row = {
            "format": name,
            "mb": round(sum(f.stat().st_size for f in path.parent.glob(path.name + "*")) / 1e6),
            "mean_kl": round(float((np.exp(ref) * (ref - lp)).sum(-1).mean()), 4),
            "top1_agree": round(float((lp.argmax(-1) == ref.argmax(-1)).mean()), 3),
        }
        row |= {k: call_ms(session, f, 20 if "t1_" in k else 5) for k, f in speed_inputs.items()}
        rows.append(row)
        print(row, flush=True)
    facts = {"workload": "SmolLM2-135M graph calls; KL at 24 positions of KJV text (8 rows x 3 lengths)"}
    print(write_results(a.out, "onnx-quant-formats", facts, rows))


if __name__ == "__main__":
    main()
