"""Quantized copies of the exported ONNX graph for ONNX Runtime on the CPU, made once at build time
with ONNX Runtime's own tooling (`onnxruntime.quantization`).

- int8: weights int8 per output column, activations rounded to uint8 per row at run time after
  SmoothQuant (alpha 0.5, channel maxima from the calibration text), MatMulInteger
  (`int8_rows.py`): integer products for decode and prompts alike.
- int4: `MatMulNBitsQuantizer`, weights 4-bit in blocks of 32 along K with a scale per block
  (symmetric, calibration-free), activations quantized to int8 per block inside the kernel
  (accuracy level 4).
`quantize_dynamic`'s per-tensor activation scales (DynamicQuantizeMatMul) wrecked SmolLM2 (its
activations have outliers); MatMulNBits 8-bit, int8's format before, computed prompts no faster
than fp32; docs/decisions.md has the comparisons (bench.onnx_quant_formats).

Each quantized graph sits in its own folder beside the fp32 export (`<onnx_dir>/<scheme>/`), with
the model shape and a `quantization.json` the runtime checks against its config."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from ..config import require_scheme
from ..model.shape import ModelShape

log = logging.getLogger(__name__)
QUANT_FILE = "quantization.json"
BLOCK = 32  # weights per scale along K
BITS = {"int8": 8, "int4": 4}
SMOOTHING = 0.5  # int8's SmoothQuant alpha
FORMAT = {
    "int8": f"MatMulInteger uint8 x int8, weights per column, activations per row, SmoothQuant {SMOOTHING}",
    "int4": f"MatMulNBits 4-bit, block {BLOCK}, symmetric, accuracy level 4",
}


def report_of(engine_dir: Path) -> dict:
    """What an engine folder's `quantization.json` records ({} when it has none)."""
    path = Path(engine_dir) / QUANT_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def recorded(engine_dir: Path) -> tuple[str, str | None]:
    """(scheme, format) an engine folder records ("none" when it records none)."""
    report = report_of(engine_dir)
    return report.get("scheme", "none"), report.get("format")


def read_scheme(engine_dir: Path) -> str:
    """The scheme an engine folder was built with ("none" when it records none)."""
    return recorded(engine_dir)[0]


def check_scheme(engine_dir: Path, configured: str) -> str:
    """The engine folder's scheme, refused when the config says another."""
    return require_scheme(read_scheme(engine_dir), configured, f"the engine graph in {engine_dir}")


def write_scheme(engine_dir: Path, report: dict) -> None:
    (Path(engine_dir) / QUANT_FILE).write_text(json.dumps(report, indent=1))


def quantize_onnx(onnx_dir: Path, scheme: str, prompts: list[list[int]] | None = None) -> Path:
    """`<onnx_dir>/<scheme>/model.onnx` from `<onnx_dir>/model.onnx`, redone when the export is
    newer or the format or calibration changed. int8 calibrates on `prompts` (token ids)."""
    from .qdq_export import digest

    if scheme not in BITS:
        raise ValueError(f"quantization {scheme!r} is not an ONNX Runtime scheme: use int8 or int4")
    if scheme == "int8" and not prompts:
        raise ValueError("quantization 'int8' on onnxruntime calibrates its SmoothQuant scales: pass the prompts")
    src, out = Path(onnx_dir) / "model.onnx", Path(onnx_dir) / scheme
    dst, calibration = out / "model.onnx", digest(prompts) if scheme == "int8" else "none (absmax)"
    made, fresh = report_of(out), dst.exists() and dst.stat().st_mtime >= src.stat().st_mtime
    if fresh and (made.get("scheme"), made.get("format"), made.get("calibration")) == (scheme, FORMAT[scheme], calibration):
        log.info("      %s graph up to date: %s", scheme, dst)
        return out
    out.mkdir(parents=True, exist_ok=True)
    if scheme == "int8":  # (int8_rows reads qdq_export, which reads this module)
        from .int8_rows import matmul_int8_rows
        from .qdq_export import projection_absmax

        shape = ModelShape.load(Path(onnx_dir) / "model_shape.json")
        matmul_int8_rows(src, dst, absmax=projection_absmax(src, shape, prompts), alpha=SMOOTHING)
    else:
        matmul_nbits(src, dst, BITS[scheme])
    shutil.copy2(Path(onnx_dir) / "model_shape.json", out / "model_shape.json")
    report = {"scheme": scheme, "format": FORMAT[scheme],
              "source_bytes": _bytes(src), "quantized_bytes": _bytes(dst), "calibration": calibration}
    write_scheme(out, report)
    log.info("      %s graph: %.1f MB -> %.1f MB", scheme, report["source_bytes"] / 1e6, report["quantized_bytes"] / 1e6)
    return out


def _bytes(model: Path) -> int:
    return sum(p.stat().st_size for p in model.parent.iterdir() if p.name.startswith(model.name))


def matmul_nbits(src: Path, dst: Path, bits: int, block: int = BLOCK, accuracy_level: int | None = 4, **kw) -> None:
    """`src`'s MatMuls with constant weights as MatMulNBits (kw: the quantizer's other options)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(src)), bits=bits, block_size=block, is_symmetric=True, accuracy_level=accuracy_level, **kw
    )
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)
