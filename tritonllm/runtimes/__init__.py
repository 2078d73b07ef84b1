"""Runtimes behind the one engine loop. Each takes a list of `StepInput`s (prefill or decode rows)
and returns one row of logits per input; each owns its KV cache."""
from __future__ import annotations

from pathlib import Path

from ..config import EngineConfig
from .base import Runtime, StepInput


def load_runtime(cfg: EngineConfig, engine_dir: Path) -> Runtime:
    if cfg.runtime == "onnxruntime":
        from .onnx_runtime import OnnxRuntime
        return OnnxRuntime(engine_dir, cfg)
    if cfg.runtime == "torch-cuda":
        from .torch_cuda import TorchCudaRuntime
        return TorchCudaRuntime(engine_dir, cfg)
    if cfg.runtime == "tensorrt":
        from .tensorrt_runtime import TensorRTRuntime
        return TensorRTRuntime(engine_dir, cfg)
    raise ValueError(f"unknown runtime {cfg.runtime!r}")


__all__ = ["Runtime", "StepInput", "load_runtime"]
