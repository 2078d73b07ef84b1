"""Build time: HF checkpoint -> engine files (ONNX export, TensorRT plan, or our torch module)
-> a Triton model repository rendered from typed config (`repository`, `pbtxt`)."""
