"""The PyTorch runtime for NVIDIA GPUs (also runs on the CPU in fp32, for parity tests)."""

from .runtime import TorchCudaRuntime

__all__ = ["TorchCudaRuntime"]
