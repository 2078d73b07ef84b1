"""Prove the TensorRT path on a GPU host: export a Llama-family model (SmolLM2-135M shape, random
weights, or --model) to ONNX with our exporter, build a serialized plan with the TensorRT Python
API (`tensorrt` or TensorRT for RTX), then try to run it. Writes build_report.json and a log."""

from __future__ import annotations

import argparse
import json
import logging
import time
import traceback
from pathlib import Path

import torch

from bench.provenance import DEFAULT_OUT, run_facts, write_json
from tritonllm.build.onnx_export import export, verify
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
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    report = run_facts(
        **{
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "capability": list(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None,
        }
    )
    ckpt = a.model
    if ckpt is None:
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: F401

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
    shape = ModelShape.load(onnx_dir / "model_shape.json")
    spec = PlanSpec(max_batch=8, max_context=512, dtype=a.dtype)
    try:
        plan = build_plan(onnx_dir / "model.onnx", onnx_dir / "trt", shape, spec)
        report["build"] = json.loads((onnx_dir / "trt" / "build_report.json").read_text())
        report["plan_bytes"] = plan.stat().st_size
    except Exception:
        report["build_error"] = traceback.format_exc()[-2000:]
    if "build" in report:
        try:
            rt = TensorRTRuntime(
                onnx_dir,
                EngineConfig(runtime="tensorrt", max_slots=8, max_context=512, max_tokens_limit=256, dtype=a.dtype),
            )
            from tritonllm.runtimes.base import StepInput

            logits = rt.step([StepInput(0, [5, 6, 7, 8], 0)])
            report["run"] = {"ok": True, "logits_shape": list(logits.shape)}
        except Exception as exc:
            report["run"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:1500]}
    log.info("%s: %s", write_json(a.out, f"trt-build-{a.dtype}", report), json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
