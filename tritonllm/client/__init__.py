"""gRPC clients of a served repository (sync, asyncio, streaming) and the `tritonllm-generate` CLI."""

from .llm_client import AsyncLLMClient, GenerationError, GenerationResult, LLMClient

__all__ = ["AsyncLLMClient", "GenerationError", "GenerationResult", "LLMClient"]
