"""Prove the TensorRT path on a GPU host: export a Llama-family model (SmolLM2-135M shape, random
weights, or --model) to ONNX with our exporter, make the Q/DQ graphs of each --quantizations
scheme (int8 / fp8 calibrated on random token ids for random weights, on the built-in text for a
real checkpoint), build a serialized plan of each with the TensorRT Python API (`tensorrt` or
TensorRT for RTX), and try to run it. Writes trt-build-<dtype>.json under --out."""

from __future__ import annotations

import argparse
import json
import logging
import time
import traceback
from pathlib import Path

import torch

from bench.provenance import DEFAULT_OUT, run_facts, write_json
from tritonllm.build.calibrate import calibration_prompts
from tritonllm.build.onnx_export import export, verify
from tritonllm.build.qdq_export import ACTIVATED, qdq_graph
from tritonllm.config import EngineConfig
from tritonllm.model.shape import ModelShape
from tritonllm.runtimes.tensorrt.plan import PlanSpec, build_plan, import_tensorrt
from tritonllm.runtimes.tensorrt.runtime import TensorRTRuntime

log = logging.getLogger(__name__)

SMOLLM2_SHAPE = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    tie_word_embeddings=True,
    rope_theta=100000.0,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", type=Path, help="HF checkpoint (default: SmolLM2-shaped random weights)")
    p.add_argument("--work", type=Path, default=Path("/tmp/trt-check"))
    p.add_argument("--out", type=Path, default=Path(DEFAULT_OUT))
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float16", "bfloat16"],
        help="graph precision of the ONNX export and the plan",
    )
    p.add_argument("--quantizations", nargs="+", default=["none"], choices=["none", "int8-wo", "int8", "fp8"])
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    report = run_facts(
        **{
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "capability": list(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None,
        }
    )
    ckpt, random_weights = a.model, a.model is None
    if random_weights:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        ckpt = a.work / "smollm2-shape"
        LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE)).save_pretrained(ckpt)
        report["model"] = "SmolLM2-135M shape, random weights, fp32"
    onnx_dir = a.work / f"onnx-{a.dtype}"
    t0 = time.perf_counter()
    export(ckpt, onnx_dir, dtype=a.dtype)
    report["export_s"], report["dtype"] = round(time.perf_counter() - t0, 1), a.dtype
    if a.dtype == "float32":
        report["onnx_vs_pytorch"] = verify(ckpt, onnx_dir)
    else:
        report["onnx_vs_pytorch"] = "not checked: ONNX Runtime's CPU provider lacks half-precision kernels"
    trt = import_tensorrt()
    report["tensorrt_module"], report["tensorrt_version"] = trt.__name__, trt.__version__
    report["graphs"] = {}
    for scheme in a.quantizations:
        graph = report["graphs"][scheme] = {}
        try:
            folder = quantized(onnx_dir, ckpt, scheme, random_weights, graph)
        except Exception:
            graph["graph_error"] = traceback.format_exc()[-2000:]
            continue
        build_and_run(folder, a.dtype, graph, trt)
    log.info("%s: %s", write_json(a.out, f"trt-build-{a.dtype}", report), json.dumps(report, indent=1))


def quantized(onnx_dir: Path, ckpt: Path, scheme: str, random_weights: bool, graph: dict) -> Path:
    """The exported graph's folder for `scheme`; records how its activations were calibrated."""
    if scheme == "none":
        return onnx_dir
    prompts = None
    if scheme in ACTIVATED:
        if random_weights:  # a random model has no text of its own: random ids exercise the same path
            g = torch.Generator().manual_seed(0)
            prompts = [torch.randint(0, SMOLLM2_SHAPE["vocab_size"], (128,), generator=g).tolist() for _ in range(8)]
            graph["calibration"] = "8 x 128 random token ids (random weights)"
        else:
            prompts = calibration_prompts(ckpt)
            graph["calibration"] = f"the built-in text, {len(prompts)} paragraphs"
    t0 = time.perf_counter()
    folder = qdq_graph(onnx_dir, scheme, prompts)
    graph["qdq_s"] = round(time.perf_counter() - t0, 1)
    graph["quantization"] = json.loads((folder / "quantization.json").read_text())
    return folder


def build_and_run(folder: Path, dtype: str, graph: dict, trt) -> None:
    """Build the plan (its parse/build times, size and layer kinds), then try one prefill step."""
    shape = ModelShape.load(folder / "model_shape.json")
    spec = PlanSpec(max_batch=8, max_context=512, dtype=dtype)
    try:
        plan = build_plan(folder / "model.onnx", folder / "trt", shape, spec)
        graph["build"] = json.loads((folder / "trt" / "build_report.json").read_text())
        graph["plan_bytes"] = plan.stat().st_size
    except Exception:
        graph["build_error"] = traceback.format_exc()[-2000:]
        return
    try:
        scheme = graph.get("quantization", {}).get("scheme", "none")
        cfg = EngineConfig(
            runtime="tensorrt", max_slots=8, max_context=512, max_tokens_limit=256, dtype=dtype, quantization=scheme
        )
        from tritonllm.runtimes.base import StepInput

        logits = TensorRTRuntime(folder, cfg).step([StepInput(0, [5, 6, 7, 8], 0)])
        graph["run"] = {"ok": True, "logits_shape": list(logits.shape)}
    except Exception as exc:
        graph["run"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:1500]}


if __name__ == "__main__":
    main()
