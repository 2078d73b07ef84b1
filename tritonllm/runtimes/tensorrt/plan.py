"""TensorRT: build a serialized plan from the project's ONNX export (at build time, or when the
engine loads where the build machine had no TensorRT).

Written against the TensorRT 10 Python API (`tensorrt`) and TensorRT for RTX (`tensorrt_rtx_libs`
+ `tensorrt_rtx_bindings`, the same style of API). Precision follows the ONNX graph's types
(TensorRT 11 / RTX networks are strongly typed; on TensorRT 10 the fp16/bf16 flags are set too).
Plans are cached under a key of model file, GPU, TensorRT version, dtype and profile."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from ...model.shape import ModelShape

log = logging.getLogger(__name__)


class TensorRTUnavailable(RuntimeError):
    pass


def import_tensorrt():
    """`tensorrt` where installed, else TensorRT for RTX's bindings."""
    try:
        import tensorrt as trt

        return trt
    except ImportError:
        pass
    try:
        import tensorrt_rtx_bindings as trt
        import tensorrt_rtx_libs  # noqa: F401  (loads the shared libraries)

        return trt
    except ImportError as e:
        raise TensorRTUnavailable(
            "neither `tensorrt` nor `tensorrt_rtx_bindings` is importable; install TensorRT "
            "(pip install tensorrt-cu12) or use --runtime torch-cuda / onnxruntime"
        ) from e


@dataclass(frozen=True)
class PlanSpec:
    max_batch: int
    max_context: int
    opt_batch: int = 8
    opt_prompt: int = 128
    dtype: str = "float16"
    workspace_gib: float = 4.0

    def profile_shapes(self, shape: ModelShape) -> dict[str, tuple[tuple, tuple, tuple]]:
        """(min, opt, max) per input: batch B, new tokens T, past P, attended S = P + T (S must equal
        P + T at each of min/opt/max: min decode T=1,P=0; opt decode T=1,P=opt_prompt; max T=P=c)."""
        b, c = self.max_batch, self.max_context
        ob, ot = min(self.opt_batch, b), min(self.opt_prompt, c)
        kv = lambda bb, p: (shape.num_layers, bb, shape.num_kv_heads, p, shape.head_dim)
        return {
            "input_ids": ((1, 1), (ob, 1), (b, c)),
            "position_ids": ((1, 1), (ob, 1), (b, c)),
            "attn_bias": ((1, 1, 1, 1), (ob, 1, 1, ot + 1), (b, 1, c, 2 * c)),
            "last_index": ((1,), (ob,), (b,)),
            "past_keys": (kv(1, 0), kv(ob, ot), kv(b, c)),
            "past_values": (kv(1, 0), kv(ob, ot), kv(b, c)),
        }


def plan_key(onnx_path: Path, spec: PlanSpec, trt) -> str:
    import torch

    st = Path(onnx_path).stat()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "nogpu"
    raw = json.dumps([str(onnx_path), st.st_size, int(st.st_mtime), gpu, trt.__version__, asdict(spec)])
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def build_plan(onnx_path: Path, out_dir: Path, shape: ModelShape, spec: PlanSpec, trt=None) -> Path:
    """Parse the ONNX, add one optimization profile over batch/prompt/KV length, build, cache."""
    trt = trt or import_tensorrt()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = out_dir / f"model-{plan_key(onnx_path, spec, trt)}.plan"
    if plan.exists():
        log.info("TensorRT plan cached: %s", plan)
        return plan
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    t0 = time.perf_counter()
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}:\n{errors}")
    parsed_s = time.perf_counter() - t0
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(spec.workspace_gib * 2**30))
    flag = {"float16": "FP16", "bfloat16": "BF16"}.get(spec.dtype)
    if flag and hasattr(trt.BuilderFlag, flag) and not _strongly_typed(network, trt):
        config.set_flag(getattr(trt.BuilderFlag, flag))
    cache_file = out_dir / "timing.cache"
    if hasattr(config, "create_timing_cache"):
        cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.exists() else b"")
        config.set_timing_cache(cache, ignore_mismatch=True)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in spec.profile_shapes(shape).items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    t1 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the plan (see the log above)")
    plan.write_bytes(bytes(serialized))
    if hasattr(config, "get_timing_cache") and config.get_timing_cache() is not None:
        cache_file.write_bytes(bytes(config.get_timing_cache().serialize()))
    report = {
        "onnx": str(onnx_path),
        "plan": str(plan),
        "plan_bytes": plan.stat().st_size,
        "parse_s": round(parsed_s, 2),
        "build_s": round(time.perf_counter() - t1, 2),
        "tensorrt": trt.__version__,
        "module": trt.__name__,
        "spec": asdict(spec),
        "layers": network.num_layers,
        "layer_types": _layer_types(network),
    }
    (out_dir / "build_report.json").write_text(json.dumps(report, indent=1))
    log.info("TensorRT plan built: %s", report)
    return plan


def _layer_types(network) -> dict[str, int]:
    """How many layers of each kind the parser made (Q/DQ graphs: QUANTIZE / DEQUANTIZE kept)."""
    kinds = Counter(str(network.get_layer(i).type).rsplit(".", 1)[-1] for i in range(network.num_layers))
    return dict(kinds.most_common())


def _strongly_typed(network, trt) -> bool:
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return flag is not None and hasattr(network, "get_flag") and bool(network.get_flag(flag))
