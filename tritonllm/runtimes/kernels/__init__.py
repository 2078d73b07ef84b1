"""OpenAI-Triton kernels of the GPU runtime: fused decoder pieces (`fused`) and small-batch
matrix products (`gemv`). Tested on the CPU through Triton's interpreter (TRITON_INTERPRET=1)."""
