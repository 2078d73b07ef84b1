"""`tritonllm-build`: HF checkpoint -> engine files -> Triton model repository.

    tritonllm-build --model build/models/smollm2 --name smollm2 --out build/model_repository
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from ..config import (
    DTYPES,
    ENGINE_PROCESS,
    KV_CACHE_DTYPES,
    KV_POLICIES,
    ORT_SPIN_AFTER_RUN,
    QUANTIZATIONS,
    RESPONSE_ORDERS,
    RUNTIMES,
    EngineConfig,
)
from .calibrate import Calibration
from .pipeline import build
from .repository import RepositoryConfig

log = logging.getLogger("tritonllm.build")


def gpu_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(g) for g in text.split(",") if g.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--gpus {text!r}: give GPU indices separated by commas, e.g. 0,1") from None


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    d = EngineConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="local HF checkpoint folder")
    p.add_argument("--name", default="llm", help="ensemble name; stages are <name>_tokenizer/_engine/_detokenizer")
    p.add_argument("--out", type=Path, default=Path("build/model_repository"))
    p.add_argument("--onnx-dir", type=Path, help="default build/onnx/<name>")
    p.add_argument("--runtime", choices=RUNTIMES, default=d.runtime)
    p.add_argument("--max-slots", type=int, default=d.max_slots)
    p.add_argument("--max-context", type=int, default=d.max_context)
    p.add_argument("--max-queue", type=int, default=d.max_queue)
    p.add_argument("--max-tokens-limit", type=int, default=d.max_tokens_limit)
    p.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens)
    p.add_argument("--request-timeout-s", type=float, default=d.request_timeout_s)
    p.add_argument("--stream-interval-ms", type=float, default=d.stream_interval_ms)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--ort-no-spin", action="store_true",
                   help="onnxruntime: compute threads sleep between ops instead of spinning (leaves the cores to "
                   "Triton's processes: faster at batch 8 on a 2-core host, slower at batch 1; docs/benchmarks.md)")
    p.add_argument("--ort-spin-after-run", choices=ORT_SPIN_AFTER_RUN, default=d.ort_spin_after_run,
                   help="onnxruntime: compute threads go on spinning after each step (on) or stop as it ends (off); "
                   "auto: off for int8 / int4 engines (docs/benchmarks.md)")
    p.add_argument("--dtype", choices=DTYPES, default=d.dtype, help="weights and KV cache (torch-cuda: bfloat16)")
    p.add_argument("--max-prefill-tokens", type=int, default=d.max_prefill_tokens,
                   help="prompt tokens one engine step prefills (bounds the stall of the running streams)")
    p.add_argument("--prefill-gather-ms", type=float, default=0.0,
                   help="while others decode, let arriving requests wait up to this long to prefill together")
    p.add_argument("--emit-text", action="store_true",
                   help="the engine detokenizes: tokenizer -> engine, no detokenizer stage (one python hop fewer)")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="compute every prompt whole instead of reusing a cached prefix's keys/values")
    p.add_argument("--kv-cache-memory-fraction", type=float, default=d.kv_cache_memory_fraction,
                   help="torch-cuda: share of the GPU's free memory (after the weights) for the KV block pool")
    p.add_argument("--kv-cache-tokens", type=int, default=d.kv_cache_tokens,
                   help="tokens the KV block pool holds (0: by --kv-cache-memory-fraction on a GPU, every slot "
                   "at --max-context on the CPU); requests are admitted by the blocks they may fill")
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default=d.kv_cache_dtype,
                   help="torch-cuda: fp8 keeps keys/values as e4m3 with a scale per layer and KV head (twice the "
                   "tokens per byte); auto: the weights' dtype")
    p.add_argument("--kv-policy", choices=KV_POLICIES, default=d.kv_policy,
                   help="admit with blocks for a request's longest length, or for its prompt and preempt "
                   "(recompute) the youngest when blocks run out (docs/engine.md)")
    p.add_argument("--quantization", choices=QUANTIZATIONS, default=d.quantization,
                   help="fp8 / int8-wo (torch-cuda), int8 / int4 (onnxruntime), int8-wo / int8 / fp8 (tensorrt Q/DQ); "
                   "docs/quantization.md")
    p.add_argument("--calibration-text", type=Path, metavar="FILE",
                   help="text (paragraphs split by blank lines) for tensorrt int8/fp8's static activation scales, "
                   "onnxruntime int8's SmoothQuant and --gptq; default: a built-in English sample")
    p.add_argument("--quantize-lm-head", action="store_true",
                   help="torch-cuda fp8/int8-wo: quantize the LM head too (int8, a scale per vocabulary row; "
                   "docs/quantization.md: what it costs)")
    p.add_argument("--tuning-cache", default=d.tuning_cache,
                   help="torch-cuda: folder of the start-up kernel tables kept per GPU kind, model shape and code "
                   "(auto: ~/.cache/tritonllm/tuning; off: tune at every start; docs/engine.md)")
    p.add_argument("--deterministic", action="store_true",
                   help="torch-cuda: only kernels that add their sums in one fixed order (no atomics): the same "
                   "logits run after run, at some speed at small batches (docs/engine.md)")
    p.add_argument("--gptq", action="store_true",
                   help="torch-cuda fp8/int8-wo: GPTQ rounding of the weights over the calibration text")
    p.add_argument("--response-threads", type=int, default=d.response_threads)
    p.add_argument("--response-order", choices=RESPONSE_ORDERS, default=d.response_order,
                   help="ends-first: a stream's first and final responses go out ahead of mid-stream ones "
                   "(docs/engine.md); arrival: in the order the engine made them")
    p.add_argument("--engine-process", choices=ENGINE_PROCESS, default=d.engine_process,
                   help="the engine loop in its own process beside Triton's python stub; auto: on for the GPU "
                   "runtimes (docs/engine.md)")
    p.add_argument("--io-processes", type=int, default=d.io_processes,
                   help="Triton model instances sharing the engine process as its request/response I/O, each with "
                   "its own GIL (docs/engine.md)")
    p.add_argument("--steps-per-launch", type=int, default=d.steps_per_launch,
                   help="torch-cuda: decode steps per host pass under load (docs/engine.md: multi_step; 1 = off)")
    p.add_argument("--multi-step-min-active", type=int, default=d.multi_step_min_active)
    p.add_argument("--launch-ahead", type=int, default=d.launch_ahead,
                   help="torch-cuda: launched steps left queued on the device while older ones complete")
    p.add_argument("--tokenizer-instances", type=int, default=1)
    p.add_argument("--detokenizer-instances", type=int, default=1)
    p.add_argument("--engine-instances", type=int, default=1, help="engine processes on the CPU instance kind")
    p.add_argument("--gpus", type=gpu_list, default=(), metavar="0,1,...",
                   help="one engine instance per listed GPU (Triton spreads requests over them)")
    a = p.parse_args(argv)
    t0 = time.time()
    try:
        engine = _engine_config(a)
        calibration = Calibration(a.calibration_text.read_text(encoding="utf-8") if a.calibration_text else None, a.gptq)
        calibration.check(engine.runtime, engine.quantization)
    except (ValueError, OSError) as e:  # a bound or a runtime/quantization pair the build cannot make
        p.error(str(e))
    cfg = RepositoryConfig(name=a.name, engine=engine, tokenizer_instances=a.tokenizer_instances,
                           detokenizer_instances=a.detokenizer_instances, engine_instances=a.engine_instances,
                           gpus=a.gpus)
    build(a.model, cfg, a.out, a.onnx_dir, calibration)
    log.info("done in %.1fs", time.time() - t0)


def _engine_config(a: argparse.Namespace) -> EngineConfig:
    return EngineConfig(runtime=a.runtime, max_slots=a.max_slots, max_context=a.max_context, max_queue=a.max_queue,
                        max_tokens_limit=min(a.max_tokens_limit, a.max_context - 1),
                        default_max_tokens=a.default_max_tokens, request_timeout_s=a.request_timeout_s,
                        stream_interval_ms=a.stream_interval_ms, threads=a.threads, dtype=a.dtype,
                        emit_text=a.emit_text, response_threads=a.response_threads,
                        response_order=a.response_order,
                        engine_process=a.engine_process, io_processes=a.io_processes,
                        max_prefill_tokens=a.max_prefill_tokens,
                        prefill_gather_ms=a.prefill_gather_ms,
                        steps_per_launch=a.steps_per_launch,
                        multi_step_min_active=a.multi_step_min_active, launch_ahead=a.launch_ahead,
                        prefix_cache=not a.no_prefix_cache, quantization=a.quantization,
                        kv_cache_memory_fraction=a.kv_cache_memory_fraction, kv_cache_tokens=a.kv_cache_tokens,
                        kv_policy=a.kv_policy, kv_cache_dtype=a.kv_cache_dtype,
                        quantize_lm_head=a.quantize_lm_head, ort_spin_wait=not a.ort_no_spin,
                        ort_spin_after_run=a.ort_spin_after_run, tuning_cache=a.tuning_cache,
                        deterministic=a.deterministic)

if __name__ == "__main__":
    main()
