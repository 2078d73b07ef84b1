"""OpenAI-Triton kernels of the GPU runtime: fused decoder pieces (`fused`), small-batch matrix
products (`gemv`) and log-probabilities (`logprobs`). Tested on the CPU through Triton's interpreter
(TRITON_INTERPRET=1)."""
