"""TensorRT: run a serialized plan (built by `plan.build_plan`) on device buffers, with the KV
cache on the device. Written against the TensorRT 10 execution-context API; the tests run it
through a stand-in that speaks the same API over ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

from ...config import EngineConfig
from ...model.graph_io import INPUTS, OUTPUTS, causal_bias
from ...model.shape import ModelShape
from ..base import Runtime, RuntimeCapabilities, StepInput
from ..host_kv import step_by_kind
from .plan import PlanSpec, TensorRTUnavailable, build_plan, import_tensorrt


def _device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)


class TensorRTRuntime(Runtime):
    """Runs a plan with one execution context. The KV cache is a device tensor; each step gathers
    the batch's past rows on the device, runs the plan and scatters the new keys/values back."""

    capabilities = RuntimeCapabilities(prompt_pieces=True, device_sampling=True)  # the plan reads the cached past

    def __init__(self, engine_dir: Path, cfg: EngineConfig, device: str = "cuda", trt=None):
        """`trt`: the TensorRT module (default: imported); tests pass a stand-in speaking the same
        execution-context API, with `device="cpu"`."""
        import torch

        trt = trt or import_tensorrt()
        engine_dir = Path(engine_dir)
        from ...build.quantize_onnx import check_scheme

        self.quantization = check_scheme(engine_dir, cfg.quantization)
        self.shape = ModelShape.load(engine_dir / "model_shape.json")
        self.max_slots, self.max_context = cfg.max_slots, cfg.max_context
        spec = PlanSpec(cfg.max_slots, cfg.max_context, dtype=cfg.dtype)
        plan = build_plan(engine_dir / "model.onnx", engine_dir / "trt", self.shape, spec, trt)
        self.device = torch.device(device)
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise TensorRTUnavailable(f"this TensorRT cannot run {plan} on {_device_name(self.device)}")
        self.context = self.engine.create_execution_context()
        import numpy as np

        kv_np = np.dtype(trt.nptype(self.engine.get_tensor_dtype("past_keys")))
        self.kv_dtype = torch.from_numpy(np.empty(0, dtype=kv_np)).dtype  # the graph's own KV type
        sh = self.shape  # the cache the plan's past inputs are gathered from: max_context per slot
        dims = (sh.num_layers, cfg.max_slots, sh.num_kv_heads, cfg.max_context, sh.head_dim)
        self.keys = torch.zeros(dims, dtype=self.kv_dtype, device=self.device)
        self.values = torch.zeros(dims, dtype=self.kv_dtype, device=self.device)
        self.stream = torch.cuda.Stream() if self.device.type == "cuda" else None

    def describe(self) -> dict:
        return {"runtime": "tensorrt", "slots": self.max_slots, "max_context": self.max_context}

    def sample(self, logits, seqs) -> list[int]:
        from ..torch_cuda.sampling import sample_batch

        return sample_batch(logits, seqs)

    def step(self, inputs: list[StepInput]):
        """Decode rows (one token each) in one execution; each prefill in its own."""
        import torch

        logits = torch.empty((len(inputs), self.shape.vocab_size), dtype=torch.float32, device=self.device)
        return step_by_kind(inputs, self._run, logits)

    def _run(self, rows: list[StepInput]):
        import numpy as np
        import torch

        b, t, p = len(rows), max(len(r.tokens) for r in rows), max(r.start for r in rows)
        dev = self.device
        slots = torch.tensor([r.slot for r in rows], device=dev)
        feed = {
            "input_ids": torch.tensor([r.tokens + [0] * (t - len(r.tokens)) for r in rows], device=dev),
            "position_ids": torch.tensor([list(range(r.start, r.start + t)) for r in rows], device=dev),
            "attn_bias": torch.from_numpy(
                causal_bias(np.array([r.start for r in rows]), np.array([len(r.tokens) for r in rows]), p, t)
            ).to(dev),
            "last_index": torch.tensor([len(r.tokens) - 1 for r in rows], device=dev),
            "past_keys": self.keys[:, slots, :, :p].contiguous(),
            "past_values": self.values[:, slots, :, :p].contiguous(),
        }
        kv_out = (self.shape.num_layers, b, self.shape.num_kv_heads, t, self.shape.head_dim)
        outs = {
            "logits": torch.empty((b, self.shape.vocab_size), dtype=torch.float32, device=dev),
            "new_keys": torch.empty(kv_out, dtype=self.kv_dtype, device=dev),
            "new_values": torch.empty(kv_out, dtype=self.kv_dtype, device=dev),
        }
        for name in INPUTS:
            self.context.set_input_shape(name, tuple(feed[name].shape))
            self.context.set_tensor_address(name, feed[name].data_ptr())
        for name in OUTPUTS:
            self.context.set_tensor_address(name, outs[name].data_ptr())
        if self.stream is None:  # host buffers (the stand-in used by the tests)
            ok = self.context.execute_async_v3(0)
        else:
            with torch.cuda.stream(self.stream):
                ok = self.context.execute_async_v3(self.stream.cuda_stream)
            self.stream.synchronize()
        if not ok:
            raise RuntimeError("TensorRT execution failed")
        self._write_kv(rows, slots, outs["new_keys"], outs["new_values"])
        return outs["logits"]

    def _write_kv(self, rows: list[StepInput], slots, new_keys, new_values) -> None:
        """Each row's new keys/values into its slot of the device cache: a decode batch (one position
        per row) in one indexed write per tensor, a prefill row by slices."""
        import torch

        if all(len(r.tokens) == 1 for r in rows):
            starts = torch.tensor([r.start for r in rows], device=self.device)
            self.keys[:, slots, :, starts] = new_keys[:, :, :, 0].transpose(0, 1)
            self.values[:, slots, :, starts] = new_values[:, :, :, 0].transpose(0, 1)
            return
        for j, r in enumerate(rows):
            n = len(r.tokens)
            self.keys[:, r.slot, :, r.start : r.start + n] = new_keys[:, j, :, :n]
            self.values[:, r.slot, :, r.start : r.start + n] = new_values[:, j, :, :n]
