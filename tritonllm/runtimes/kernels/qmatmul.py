"""Products with 8-bit weights (model/quant.py) at batch sizes beyond the small-batch kernels of
`gemv` (more than MAX_DOT_ROWS rows: large decode batches and prefill), chosen per (weight kind,
rows) by timing at start-up, like `gemv.tune`:

- `tile_matmul` (OpenAI Triton): a tiled GEMM that loads int8 / float8 weight tiles, widens them in
  registers and runs the Tensor Cores in the activations' dtype; the scale is applied per output.
- `fp8_matmul` (fp8 weights only): activations quantized per token (dynamic scales) and one FP8
  Tensor Core GEMM with row-wise scales (`torch._scaled_mm`, cuBLASLt), at twice bf16's peak.
- `reference`: dequantize the weight, then cuBLAS (the fallback; what the others are checked against).

Where the FP8 GEMM runs, the kernel that makes its input (add + norm, the gated activation:
`fused.py`) can round it per row itself and hand over `QuantRows`: the same e4m3 values and scales
as `quantize_rows`, without a kernel and a round trip of the activations of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .gemv import agrees, graph_ms, reference
from .rows import FP8_ALIGN, QuantRows

log = logging.getLogger(__name__)
# (rows of x, rows of W, K step, warps, stages) per program
TILE_CONFIGS = ((64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (128, 256, 64, 8, 3))
GROUP_M = 8  # programs along M that sweep the same columns of W together (the weight tiles stay in L2)
Choice = "str | tuple[int, ...]"  # "reference", "fp8", or a TILE_CONFIGS entry


@triton.jit
def _tile_kernel(
    x,
    w,
    w_scale,
    bias,
    out,
    M,
    N,
    K,
    s_xm,
    s_wn,
    s_om,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr,
):
    pid = tl.program_id(0)
    grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    width = GROUP * grid_n  # programs in one group of GROUP row blocks
    first_m = (pid // width) * GROUP
    size_m = tl.minimum(grid_m - first_m, GROUP)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = m < M, n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        xt = tl.load(x + m[:, None] * s_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w + n[:, None] * s_wn + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.dot(xt, tl.trans(wt.to(xt.dtype)))
    acc *= tl.load(w_scale + n, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out + m[:, None] * s_om + n[None, :], acc.to(out.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _quantize_rows_kernel(x, q, scale, K, s_x, s_q, QMAX: tl.constexpr, BLOCK: tl.constexpr):
    """One row: its absmax, then every value over absmax / QMAX rounded to q's type (e4m3)."""
    row = tl.program_id(0)
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        amax = tl.maximum(amax, tl.abs(tl.load(x + row * s_x + k, mask=k < K, other=0.0).to(tl.float32)))
    step = tl.maximum(tl.max(amax, axis=0), 1e-12) / QMAX
    tl.store(scale + row, step)
    for k0 in range(0, K, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        v = tl.load(x + row * s_x + k, mask=k < K, other=0.0).to(tl.float32) / step
        v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
        tl.store(q + row * s_q + k, v.to(q.dtype.element_ty, fp_downcast_rounding="rtne"), mask=k < K)


def quantize_rows(x2: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`model.quant.quantize_rows` in one kernel (the torch ops take five launches per product)."""
    m, k = x2.shape
    q = torch.empty((m, k), dtype=dtype, device=x2.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x2.device)
    _quantize_rows_kernel[(m,)](x2, q, scale, k, x2.stride(0), q.stride(0), QMAX=torch.finfo(dtype).max, BLOCK=1024)
    return q, scale


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def tile_matmul(x, weight, scale, bias, config: tuple[int, ...]) -> torch.Tensor:
    """x [..., K] @ (weight [N, K] 8-bit * scale [N]).T + bias -> [..., N] in x's dtype."""
    x2, n = _rows(x), weight.shape[0]
    m, k = x2.shape
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    bm, bn, bk, warps, stages = config
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _tile_kernel[grid](
        x2,
        weight,
        scale,
        bias if bias is not None else scale,
        out,
        m,
        n,
        k,
        x2.stride(0),
        weight.stride(0),
        out.stride(0),
        HAS_BIAS=bias is not None,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        GROUP=GROUP_M,
        num_warps=warps,
        num_stages=stages,
    )
    return out.view(*x.shape[:-1], n)


def round_rows(x: torch.Tensor, fmt: torch.dtype) -> QuantRows:
    """x [..., K] rounded to `fmt` per row by the quantize kernel (the same rounding as
    model.quant's), rows padded to FP8_ALIGN: what a fused producer would have handed over."""
    x2 = _rows(x)
    pad = -x2.shape[0] % FP8_ALIGN
    if pad:
        x2 = torch.nn.functional.pad(x2, (0, 0, 0, pad))
    return QuantRows(*quantize_rows(x2, fmt), x.shape, x.dtype)


def fp8_matmul(x, weight, scale, bias) -> torch.Tensor:
    """The FP8 Tensor Core product: x quantized per row to e4m3 (here, or already: `QuantRows`),
    weight [N, K] e4m3 with its per-channel scale; float32 accumulation, output in x's dtype."""
    if not isinstance(x, QuantRows):
        x = round_rows(x, weight.dtype)
    y = torch._scaled_mm(x.q, weight.t(), scale_a=x.scale, scale_b=scale.view(1, -1), out_dtype=x.dtype)
    y = y[: x.rows] if y.shape[0] != x.rows else y
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], weight.shape[0])


def matmul(x, weight, scale, bias, choice: Choice) -> torch.Tensor:
    """The product by a tuned choice."""
    if choice == "fp8":
        return fp8_matmul(x, weight, scale, bias)
    if choice == "reference":
        return reference(x, weight, bias, scale)
    return tile_matmul(x, weight, scale, bias, choice)


def choose(table: dict, kind: str, rows: int) -> Choice:
    """The choice tuned for the smallest row count >= rows (else the largest tuned); "reference"
    when nothing was tuned (no GPU, or the kernels did not build)."""
    tuned = sorted(r for k, r in table if k == kind)
    if not tuned:
        return "reference"
    return table[(kind, next((r for r in tuned if r >= rows), tuned[-1]))]


def _agrees(x, w, b, s, choice) -> bool:
    # FP8 activations keep 3 mantissa bits: each product term is off by up to 2^-4 relative
    tolerance = 0.1 if choice == "fp8" else 2e-2
    return agrees(f"quantized product {choice}", lambda: matmul(x, w, s, b, choice), reference(x, w, b, s), tolerance)


def tune(weights: dict[str, Sequence[tuple]], rows: Sequence[int], dtype: torch.dtype) -> tuple[dict, list[dict]]:
    """{(kind, rows): choice} for each weight kind (its (qweight, bias, scale) of every layer) and
    row count, timed over every layer's weight in turn, and the timings (microseconds)."""
    table, report = {}, []
    for kind, mats in weights.items():
        w0 = mats[0][0]
        candidates = [*TILE_CONFIGS, *(["fp8"] if w0.dtype == torch.float8_e4m3fn else [])]
        for m in rows:
            x = torch.randn(m, w0.shape[1], device=w0.device, dtype=dtype)
            run = lambda c: lambda: [matmul(x, w, s, b, c) for w, b, s in mats]
            times = {"reference": graph_ms(run("reference"))}
            for c in (c for c in candidates if _agrees(x, *mats[0], c)):
                times[c] = graph_ms(run(c))
            table[(kind, m)] = best = min(times, key=times.get)
            us = {str(c): round(1e3 * t, 1) for c, t in times.items()}
            report.append({"kind": kind, "rows": m, "chosen": str(best), "us": us})
    for r in report:
        log.info("quantized product %s x%d: %s (%s)", r["kind"], r["rows"], r["chosen"], r["us"])
    return table, report
