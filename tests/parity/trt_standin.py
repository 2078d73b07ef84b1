"""A stand-in for the `tensorrt` module, for testing TensorRTRuntime where no runnable TensorRT
exists (this machine, and the lent H100: TensorRT for RTX refuses compute capability 9.0). It
speaks the part of the TensorRT 10 API the runtime uses (Runtime, engine tensor dtypes, an
execution context with set_input_shape / set_tensor_address / execute_async_v3) and executes the
project's ONNX with ONNX Runtime on the raw host buffers the runtime hands it. It checks our
buffer wiring, shapes and KV-cache handling; it says nothing about TensorRT itself."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

__version__ = "standin"
ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(float16)": np.float16,
}


class Logger:
    WARNING = 2

    def __init__(self, level):
        self.level = level


def nptype(dtype):
    return dtype


def write_plan(path: Path, onnx: Path) -> None:
    """A 'plan' that names the ONNX file the stand-in engine runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(str(onnx))


class Runtime:
    def __init__(self, logger):
        self.logger = logger

    def deserialize_cuda_engine(self, data: bytes) -> Engine:
        return Engine(Path(data.decode()))


class Engine:
    def __init__(self, onnx: Path):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        # keep DequantizeLinear -> MatMul as written (ONNX Runtime would otherwise fuse Q/DQ graphs
        # into integer kernels that also quantize the activations, which TensorRT's weight-only
        # plans do not)
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
        self.session = ort.InferenceSession(str(onnx), opts, providers=["CPUExecutionProvider"])
        self.types = {t.name: ORT_TYPES[t.type] for t in self.session.get_inputs() + self.session.get_outputs()}
        self.executions = 0
        self.batches: list[int] = []  # input_ids rows of each execution

    def get_tensor_dtype(self, name: str):
        return self.types[name]

    def create_execution_context(self) -> Context:
        return Context(self)


def _view(ptr: int, dtype, shape) -> np.ndarray:
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return (
        np.frombuffer((ctypes.c_char * n).from_address(ptr), dtype=dtype).reshape(shape)
        if n
        else np.empty(shape, dtype=dtype)
    )


class Context:
    def __init__(self, engine: Engine):
        self.engine, self.shapes, self.addresses = engine, {}, {}

    def set_input_shape(self, name: str, shape) -> bool:
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        e = self.engine
        feed = {
            i.name: _view(self.addresses[i.name], e.types[i.name], self.shapes[i.name]).copy()
            for i in e.session.get_inputs()
        }
        for out, value in zip([o.name for o in e.session.get_outputs()], e.session.run(None, feed)):
            _view(self.addresses[out], e.types[out], value.shape)[...] = value
        e.executions += 1
        e.batches.append(self.shapes["input_ids"][0])
        return True
