"""tritonllm: Hugging Face causal LMs as Triton Inference Server model repositories.

Folders: `model` (the decoder and its shape), `build` (checkpoint -> engine -> repository),
`engine` (scheduler and generation loop, Triton-free), `runtimes` (ONNX Runtime, PyTorch-CUDA
with OpenAI-Triton kernels, TensorRT), `triton` (python-backend adapters, metrics, server
process), `client` (gRPC clients and CLI). Shared vocabulary: `config`, `tensors`, `text`, `errors`."""

__version__ = "0.2.0"
