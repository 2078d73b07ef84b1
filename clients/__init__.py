"""Python gRPC client for tritonllm ensembles (also works with TensorRT-LLM-style ensembles)."""
from .llm_client import AsyncLLMClient, GenerationError, GenerationResult, LLMClient

__all__ = ["LLMClient", "AsyncLLMClient", "GenerationResult", "GenerationError"]
