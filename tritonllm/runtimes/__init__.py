"""Runtimes behind the one engine loop, each speaking the `Runtime` contract (`base`): ONNX
Runtime on the CPU (the embedded default), PyTorch on NVIDIA GPUs (`torch_cuda`, with the
OpenAI-Triton `kernels`), TensorRT plans (`tensorrt`). Each owns its KV cache."""

from __future__ import annotations

from pathlib import Path

from ..config import EngineConfig
from .base import Runtime, RuntimeCapabilities, RuntimeStats, StepInput


def load_runtime(cfg: EngineConfig, engine_dir: Path, device: str = "cuda") -> Runtime:
    """The runtime `cfg.runtime` names, over the engine files in `engine_dir` (imported here so a
    repository serves with only its own runtime's packages installed); GPU runtimes run on `device`
    ("cuda:1": the engine instance Triton placed on GPU 1)."""
    if cfg.runtime == "onnxruntime":
        from .onnx_runtime import OnnxRuntime

        return OnnxRuntime(engine_dir, cfg)
    if cfg.runtime == "torch-cuda":
        from .torch_cuda import TorchCudaRuntime

        return TorchCudaRuntime(engine_dir, cfg, device=device)
    if cfg.runtime == "tensorrt":
        from .tensorrt.runtime import TensorRTRuntime

        return TensorRTRuntime(engine_dir, cfg, device=device)
    raise ValueError(f"unknown runtime {cfg.runtime!r}: use one of onnxruntime, torch-cuda, tensorrt")


__all__ = ["Runtime", "RuntimeCapabilities", "RuntimeStats", "StepInput", "load_runtime"]
