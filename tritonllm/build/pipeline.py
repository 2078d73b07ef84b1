"""The build's steps: engine files for a runtime, then the model repository. Each step logs
`[k/3]`: 1 engine files, 2 their verification or plan, 3 the repository."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from ..config import EngineConfig
from .calibrate import Calibration, calibration_prompts, gptq_prompts
from .onnx_export import EXPORT_VERSION
from .repository import RepositoryConfig, write_repository

log = logging.getLogger("tritonllm.build")


def export_cached(checkpoint: Path, onnx_dir: Path) -> dict:
    """Export and verify once per checkpoint; re-export when the checkpoint is newer or the
    exported graph changed (EXPORT_VERSION). Returns the verification report."""
    from .onnx_export import export, verify

    onnx_path, report_path = onnx_dir / "model.onnx", onnx_dir / "verify.json"
    newest = max(p.stat().st_mtime for p in Path(checkpoint).iterdir())
    fresh = report_path.exists() and json.loads(report_path.read_text()).get("export_version") == EXPORT_VERSION
    if onnx_path.exists() and fresh and onnx_path.stat().st_mtime >= newest:
        log.info("[1/3] ONNX export up to date: %s", onnx_path)
        log.info("[2/3] verified earlier: %s", report_path)
        return json.loads(report_path.read_text())
    log.info("[1/3] exporting %s to ONNX", checkpoint)
    export(checkpoint, onnx_dir)
    log.info("[2/3] verifying the ONNX graph against PyTorch")
    return verify(checkpoint, onnx_dir)


def build_tensorrt_plan(onnx_dir: Path, engine: EngineConfig) -> None:
    """Build the plan now where TensorRT is installed; otherwise the engine builds it at load."""
    from ..model.shape import ModelShape
    from ..runtimes.tensorrt.plan import PlanSpec, TensorRTUnavailable, build_plan

    try:
        build_plan(onnx_dir / "model.onnx", onnx_dir / "trt", ModelShape.load(onnx_dir / "model_shape.json"),
                   PlanSpec(engine.max_slots, engine.max_context, dtype=engine.dtype))
    except TensorRTUnavailable as e:
        log.warning("[2/3] %s: the plan will be built when the engine loads", e)


def engine_files(
    checkpoint: Path,
    name: str,
    engine: EngineConfig,
    onnx_dir: Path | None = None,
    calibration: Calibration = Calibration(),
) -> Path:
    """Steps 1-2: the folder of engine files for `engine.runtime`."""
    from transformers import AutoConfig

    from ..model.families import check_context
    from ..model.quant import check_device_support

    calibration.check(engine.runtime, engine.quantization)
    check_context(AutoConfig.from_pretrained(checkpoint), engine.max_context)  # before any export
    check_device_support(engine.quantization, None, engine.runtime)  # the build host's GPU, if any
    if engine.runtime == "torch-cuda":  # our module with its weights, saved for torch alone
        from ..model.modeling import save_engine_model

        log.info("[1/3] saving the PyTorch engine (%s, quantization %s)", engine.dtype, engine.quantization)
        prompts = gptq_prompts(checkpoint, calibration) if calibration.gptq else None
        out = save_engine_model(
            checkpoint,
            Path("build/engines") / name,
            engine.dtype,
            engine.quantization,
            prompts,
            calibration.describe(),
            engine.quantize_lm_head,
        )
        log.info("[2/3] nothing to verify: the module is the one the parity tests check")
        return out
    onnx_dir = onnx_dir or Path("build/onnx") / name
    report = export_cached(checkpoint, onnx_dir)
    log.info("      ONNX vs PyTorch: %s", json.dumps(report))
    if engine.quantization != "none":
        log.info("      quantizing the graph's weights: %s", engine.quantization)
        onnx_dir = quantized_graph(onnx_dir, engine, checkpoint, calibration.text)
    if engine.runtime == "tensorrt":
        build_tensorrt_plan(onnx_dir, engine)
    return onnx_dir


def quantized_graph(
    onnx_dir: Path, engine: EngineConfig, checkpoint: Path | None = None, calibration_text: str | None = None
) -> Path:
    """The folder of the exported graph quantized for the engine's runtime: ONNX Runtime's own
    formats (int8 calibrated), or Q/DQ for TensorRT's builder (int8 / fp8 calibrated); calibration
    on `calibration_text`, the default text when None, tokenized by the checkpoint's tokenizer."""
    if engine.runtime == "tensorrt":
        from .qdq_export import ACTIVATED, qdq_graph

        prompts = None
        if engine.quantization in ACTIVATED:
            if checkpoint is None:
                raise ValueError(f"quantization {engine.quantization!r} on tensorrt calibrates: pass the checkpoint")
            prompts = calibration_prompts(checkpoint, calibration_text)
        return qdq_graph(onnx_dir, engine.quantization, prompts)
    from .quantize_onnx import quantize_onnx

    prompts = None
    if engine.quantization == "int8":
        if checkpoint is None:
            raise ValueError("quantization 'int8' on onnxruntime calibrates: pass the checkpoint")
        prompts = calibration_prompts(checkpoint, calibration_text)
    return quantize_onnx(onnx_dir, engine.quantization, prompts)


def build(
    checkpoint: Path,
    cfg: RepositoryConfig,
    out: Path,
    onnx_dir: Path | None = None,
    calibration: Calibration = Calibration(),
) -> Path:
    """The whole build: engine files, then this LLM's models in the repository at `out`."""
    engine_dir = engine_files(checkpoint, cfg.name, cfg.engine, onnx_dir, calibration)
    log.info("[3/3] writing model repository %s (models %s)", out, ", ".join(cfg.model_names()))
    return write_repository(out, cfg, checkpoint, engine_dir)
