"""An OpenAI-compatible HTTP front door (`tritonllm-openai`): FastAPI beside any Triton serving a
tritonllm repository, talking to each LLM's engine over gRPC with its own tokenization and
detokenization, so a client that disconnects cancels its engine request."""
