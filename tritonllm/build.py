"""Build pipeline: HF checkpoint -> ONNX export (with KV cache) -> verified engine -> model repository.

    python -m tritonllm.build --model build/models/smollm2 --name smollm2 --out build/model_repository
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from .config import RUNTIMES, EngineConfig
from .onnx_export import EXPORT_VERSION
from .repository import RepositoryConfig, write_repository

log = logging.getLogger("tritonllm.build")


def export_cached(checkpoint: Path, onnx_dir: Path) -> dict:
    """Export and verify once per checkpoint; re-export when the checkpoint is newer."""
    from .onnx_export import export, verify

    onnx_path, report_path = onnx_dir / "model.onnx", onnx_dir / "verify.json"
    newest = max(p.stat().st_mtime for p in Path(checkpoint).iterdir())
    fresh = report_path.exists() and json.loads(report_path.read_text()).get("export_version") == EXPORT_VERSION
    if onnx_path.exists() and fresh and onnx_path.stat().st_mtime >= newest:
        log.info("[1/3] ONNX export up to date: %s", onnx_path)
        return json.loads(report_path.read_text())
    log.info("[1/3] exporting %s to ONNX", checkpoint)
    export(checkpoint, onnx_dir)
    log.info("[2/3] verifying the ONNX graph against PyTorch")
    return verify(checkpoint, onnx_dir)


def build_tensorrt_plan(onnx_dir: Path, engine: EngineConfig) -> None:
    """Build the plan now where TensorRT is installed; otherwise the engine builds it at load."""
    from .modeling import ModelShape
    from .runtimes.tensorrt_runtime import PlanSpec, TensorRTUnavailable, build_plan

    try:
        build_plan(onnx_dir / "model.onnx", onnx_dir / "trt", ModelShape.load(onnx_dir / "model_shape.json"),
                   PlanSpec(engine.max_slots, engine.max_context, dtype=engine.dtype))
    except TensorRTUnavailable as e:
        log.warning("[2/3] %s: the plan will be built when the engine loads", e)


def main(argv: list[str] | None = None) -> Path:
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
    p.add_argument("--dtype", default=d.dtype)
    p.add_argument("--max-prefill-tokens", type=int, default=d.max_prefill_tokens,
                   help="prompt tokens one engine step prefills (bounds the stall of the running streams)")
    p.add_argument("--prefill-gather-ms", type=float, default=0.0,
                   help="while others decode, let arriving requests wait up to this long to prefill together")
    p.add_argument("--emit-text", action="store_true",
                   help="the engine detokenizes: tokenizer -> engine, no detokenizer stage (one python hop fewer)")
    p.add_argument("--response-threads", type=int, default=d.response_threads)
    p.add_argument("--steps-per-launch", type=int, default=d.steps_per_launch,
                   help="torch-cuda: decode steps per host pass under load (README: multi-step; 1 = off)")
    p.add_argument("--multi-step-min-active", type=int, default=d.multi_step_min_active)
    p.add_argument("--launch-ahead", type=int, default=d.launch_ahead,
                   help="torch-cuda: launched steps left queued on the device while older ones complete")
    p.add_argument("--tokenizer-instances", type=int, default=1)
    p.add_argument("--detokenizer-instances", type=int, default=1)
    a = p.parse_args(argv)
    t0 = time.time()
    engine = EngineConfig(runtime=a.runtime, max_slots=a.max_slots, max_context=a.max_context, max_queue=a.max_queue,
                          max_tokens_limit=min(a.max_tokens_limit, a.max_context - 1),
                          default_max_tokens=a.default_max_tokens, request_timeout_s=a.request_timeout_s,
                          stream_interval_ms=a.stream_interval_ms, threads=a.threads, dtype=a.dtype,
                          emit_text=a.emit_text, response_threads=a.response_threads,
                          max_prefill_tokens=a.max_prefill_tokens, prefill_gather_ms=a.prefill_gather_ms,
                          steps_per_launch=a.steps_per_launch,
                          multi_step_min_active=a.multi_step_min_active, launch_ahead=a.launch_ahead)
    cfg = RepositoryConfig(name=a.name, engine=engine, tokenizer_instances=a.tokenizer_instances,
                           detokenizer_instances=a.detokenizer_instances)
    onnx_dir = a.onnx_dir or Path("build/onnx") / a.name
    if a.runtime == "torch-cuda":  # the engine is our module with its weights, saved for torch alone
        from .modeling import save_engine_model

        log.info("[1/3] saving the PyTorch engine (%s)", a.dtype)
        onnx_dir = save_engine_model(a.model, Path("build/engines") / a.name, a.dtype)
    else:
        report = export_cached(a.model, onnx_dir)
        log.info("      ONNX vs PyTorch: %s", json.dumps(report))
    if a.runtime == "tensorrt":
        build_tensorrt_plan(onnx_dir, engine)
    log.info("[3/3] writing model repository %s (models %s, %s, %s, %s)", a.out, cfg.name,
             cfg.stage("tokenizer"), cfg.stage("engine"), cfg.stage("detokenizer"))
    write_repository(a.out, cfg, a.model, onnx_dir)
    log.info("done in %.1fs", time.time() - t0)
    return a.out


if __name__ == "__main__":
    main()
