"""Products with 8-bit weights (model/quant.py) at batch sizes beyond the small-batch kernels of
`gemv` (more than MAX_DOT_ROWS rows: large decode batches and prefill), chosen per (weight kind,
rows) by timing at start-up, like `gemv_tuning.tune`:

- `tile_matmul` (OpenAI Triton): a tiled GEMM that loads int8 / float8 weight tiles, widens them in
  registers and runs the Tensor Cores in the activations' dtype; the scale is applied per output.
  Its float8 x float8 form (`X8_TILES`) multiplies rows rounded to e4m3 per row by the weight as
  stored, the row and channel scales applied once at the end, optionally split along K into
  partial sums (`gemv.SplitK`) that the next fused kernel adds up. The same tiles multiply int8
  weights by rows rounded to int8 per row (int32 sums on the integer Tensor Cores, twice bf16's
  rate), where the engine allows int8 activations for the kind (`tune`'s `int8_rows`).
- `fp8_matmul` (fp8 weights only): activations quantized per token (dynamic scales) and one FP8
  Tensor Core GEMM with row-wise scales (`torch._scaled_mm`), at twice bf16's peak; `FP8_FAST` the
  same with fast accumulation (partial sums kept at the Tensor Cores' own precision).
- `reference`: dequantize the weight, then cuBLAS (the fallback; what the others are checked against).

Where a product takes rows rounded per row (`takes_rounded`), the kernel that makes its input (add +
norm, the gated activation: `fused.py`) can round it itself and hand over `QuantRows`: the same
e4m3 values and scales as `quantize_rows`, without a kernel and a round trip of the activations of
its own.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .gemv import SplitK, dense, reference
from .rows import FP8_ALIGN, QuantRows, float8_of
from .timing import agrees, check_all, graph_ms

log = logging.getLogger(__name__)
# (rows of x, rows of W, K step, warps, stages) per program
TILE_CONFIGS = ((64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (128, 256, 64, 8, 3))
# float8 weights on rows rounded per row: (rows of x, rows of W, K step, warps, stages) float8 x
# float8, each also split along K (a 6th number S) for the kinds whose consumer adds up partial
# sums: a 4,096-row weight (Llama-3.1-8B's o and down) at 128-256 rows leaves 128 x 128 output tiles
# 32-64 programs for 132 SMs. (A 128 x 256 tile at 8 warps took 3-12x the others' time at every
# row count on an H100, docs/decisions.md: not a candidate.)
X8_TILES = ((64, 128, 128, 4, 4), (128, 128, 128, 8, 4), (64, 256, 128, 8, 3))
X8_SPLITS = (1, 2, 4)
GROUP_M = 8  # programs along M that sweep the same columns of W together (the weight tiles stay in L2)
FP8, FP8_FAST = "fp8", "fp8-fast"  # the FP8 GEMM, with precise or fast accumulation
Choice = "str | tuple[int, ...]"  # "reference", FP8, FP8_FAST, or a TILE_CONFIGS / X8_TILES (+ split) entry


@triton.jit
def _tile_kernel(
    x,
    x_scale,
    w,
    w_scale,
    bias,
    out,
    M,
    N,
    K,
    K_SPLIT,
    s_xm,
    s_wn,
    s_os,
    s_om,
    HAS_BIAS: tl.constexpr,
    X8: tl.constexpr,
    INT8: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr,
):
    """One output tile over this program's slice of K (program_id 1: [split * K_SPLIT, ...)); X8:
    x is rounded per row (`x_scale` [M]) to the weight's 8-bit type and multiplies it as it is
    (INT8: int8 x int8, summed exactly in int32)."""
    pid, split = tl.program_id(0), tl.program_id(1)
    grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    width = GROUP * grid_n  # programs in one group of GROUP row blocks
    first_m = (pid // width) * GROUP
    size_m = tl.minimum(grid_m - first_m, GROUP)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = m < M, n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32 if INT8 else tl.float32)
    for k0 in range(split * K_SPLIT, (split + 1) * K_SPLIT, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        xt = tl.load(x + m[:, None] * s_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w + n[:, None] * s_wn + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        if X8:
            acc += tl.dot(xt, tl.trans(wt))
        else:
            acc += tl.dot(xt, tl.trans(wt.to(xt.dtype)))
    y = acc.to(tl.float32)
    if X8:
        y *= tl.load(x_scale + m, mask=m_ok, other=0.0)[:, None]
    y *= tl.load(w_scale + n, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        if split == 0:
            y += tl.load(bias + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    ptrs = out + split * s_os + m[:, None] * s_om + n[None, :]
    tl.store(ptrs, y.to(out.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _quantize_rows_kernel(x, q, scale, K, s_x, s_q, QMAX: tl.constexpr, INT: tl.constexpr, BLOCK: tl.constexpr):
    """One row: its absmax, then every value over absmax / QMAX rounded to q's type (e4m3, or
    int8 where INT: to the nearest integer, halves away from zero)."""
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
        if INT:
            v = tl.where(v >= 0, tl.floor(v + 0.5), -tl.floor(0.5 - v))
            tl.store(q + row * s_q + k, v.to(q.dtype.element_ty), mask=k < K)
        else:
            tl.store(q + row * s_q + k, v.to(q.dtype.element_ty, fp_downcast_rounding="rtne"), mask=k < K)


def quantize_rows(x2: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`model.quant.quantize_rows` in one kernel (the torch ops take five launches per product);
    int8 rows scale each row's absmax to 127."""
    m, k = x2.shape
    q = torch.empty((m, k), dtype=dtype, device=x2.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x2.device)
    integer = not dtype.is_floating_point
    qmax = torch.iinfo(dtype).max if integer else torch.finfo(dtype).max
    _quantize_rows_kernel[(m,)](x2, q, scale, k, x2.stride(0), q.stride(0), QMAX=qmax, INT=integer, BLOCK=1024)
    return q, scale


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def tile_matmul(x, weight, scale, bias, config: tuple[int, ...]):
    """x [..., K] @ (weight [N, K] 8-bit * scale [N]).T + bias -> [..., N] in x's dtype. A 5-number
    config widens the weight to x's dtype; a 6-number one (`X8_TILES` + splits S) takes x rounded
    per row to the weight's type (`QuantRows`, rounded here if it is not: float8, or int8 for an
    int8 weight) and returns `SplitK` partial sums where S > 1."""
    x8 = len(config) == 6
    if x8 and not isinstance(x, QuantRows):
        x = round_rows(x, weight.dtype)
    if isinstance(x, QuantRows) and not x8:
        raise ValueError(f"tile {config} widens the weight to the activations' type: it takes a tensor, not QuantRows")
    if x8 and x.q.dtype != weight.dtype:
        raise ValueError(f"tile {config} multiplies {x.q.dtype} rows by a {weight.dtype} weight: round x to its type")
    x2, x_scale = (x.q, x.scale) if x8 else (_rows(x), scale)  # (no row scales: any pointer)
    shape, dtype = x.shape, x.dtype
    m, n, k = shape.numel() // shape[-1], weight.shape[0], shape[-1]
    bm, bn, bk, warps, stages = config[:5]
    splits = config[5] if x8 else 1
    out = torch.empty((splits, m, n), dtype=dtype if splits == 1 else torch.float32, device=x2.device)
    _tile_kernel[(triton.cdiv(m, bm) * triton.cdiv(n, bn), splits)](
        x2,
        x_scale,
        weight,
        scale,
        bias if bias is not None else scale,
        out,
        m,
        n,
        k,
        triton.cdiv(triton.cdiv(k, splits), bk) * bk,  # whole K steps per slice
        x2.stride(0),
        weight.stride(0),
        out.stride(0),
        out.stride(1),
        HAS_BIAS=bias is not None,
        X8=x8,
        INT8=x8 and weight.dtype == torch.int8,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        GROUP=GROUP_M,
        num_warps=warps,
        num_stages=stages,
    )
    return SplitK(out, dtype) if splits > 1 else out.view(*shape[:-1], n)


def round_rows(x: torch.Tensor, fmt: torch.dtype) -> QuantRows:
    """x [..., K] rounded to `fmt` per row by the quantize kernel (the same rounding as
    model.quant's), rows padded to FP8_ALIGN: what a fused producer would have handed over."""
    x2 = _rows(x)
    pad = -x2.shape[0] % FP8_ALIGN
    if pad:
        x2 = torch.nn.functional.pad(x2, (0, 0, 0, pad))
    return QuantRows(*quantize_rows(x2, fmt), x.shape, x.dtype)


def fp8_matmul(x, weight, scale, bias, fast: bool = False) -> torch.Tensor:
    """The FP8 Tensor Core product: x quantized per row to e4m3 (here, or already: `QuantRows`),
    weight [N, K] e4m3 with its per-channel scale; float32 accumulation (`fast`: the Tensor Cores'
    own, promoted less often), output in x's dtype."""
    if not isinstance(x, QuantRows):
        x = round_rows(x, weight.dtype)
    y = torch._scaled_mm(
        x.q, weight.t(), scale_a=x.scale, scale_b=scale.view(1, -1), out_dtype=x.dtype, use_fast_accum=fast
    )
    y = y[: x.rows] if y.shape[0] != x.rows else y
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], weight.shape[0])


def takes_rounded(choice: Choice) -> bool:
    """A choice whose product multiplies rows rounded per row (`QuantRows`) to the weight's 8-bit
    type: the FP8 GEMM, or an 8-bit x 8-bit tile."""
    return choice in (FP8, FP8_FAST) or (isinstance(choice, tuple) and len(choice) == 6)


def matmul(x, weight, scale, bias, choice: Choice):
    """The product by a tuned choice (a tensor, or `SplitK` partial sums for a split tile)."""
    if choice in (FP8, FP8_FAST):
        return fp8_matmul(x, weight, scale, bias, fast=choice == FP8_FAST)
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


def candidates(weight: torch.Tensor, split_ok: bool, int8_rows: bool = False) -> list:
    """What is timed for an 8-bit weight: the widening tiles; for float8 weights the FP8 GEMM both
    ways and the float8 x float8 tiles (which the widening ones never beat), split along K where
    the consumer adds up partial sums (`split_ok`) and every slice holds a K step; for int8
    weights, where `int8_rows` allows their input rounded to int8, the int8 x int8 tiles too."""
    splits = [s for s in X8_SPLITS if s == 1 or (split_ok and weight.shape[1] >= s * 128)]
    x8 = [(*t, s) for t in X8_TILES for s in splits]
    if weight.dtype == torch.float8_e4m3fn:
        return [FP8, FP8_FAST, *x8]
    return [*TILE_CONFIGS, *x8] if int8_rows and weight.dtype == torch.int8 else list(TILE_CONFIGS)


def tune(
    weights: dict[str, Sequence[tuple]],
    rows: Sequence[int],
    dtype: torch.dtype,
    consumers: dict | None = None,
    consumer_rows: int = 0,
    rounded: frozenset = frozenset(),
    int8_rows: frozenset = frozenset(),
) -> tuple[dict, list[dict]]:
    """{(kind, rows): choice} for each weight kind (its (qweight, bias, scale) of every layer) and
    row count, timed over every layer's weight in turn, and the timings (microseconds). Up to
    `consumer_rows` rows (a decode batch) each product is timed followed by its kind's consumer
    (`consumers`, as `gemv_tuning.tune`), and those kinds also try split tiles; the kinds in `rounded`
    time the products that take rounded rows on rows rounded already (their producers round them),
    the others round them in the product; int8 weights of the kinds in `int8_rows` also try
    int8 x int8 tiles."""
    table, report = {}, []
    for kind, mats in weights.items():
        w0 = mats[0][0]
        for m in rows:
            consume = (consumers or {}).get(kind) if m <= consumer_rows else None
            x = torch.randn(m, w0.shape[1], device=w0.device, dtype=dtype)
            xr = round_rows(x, w0.dtype) if kind in rounded and float8_of(w0) else x
            times, ref = {}, reference(x, *mats[0]).float()  # (float once: `agrees` compares in float32)
            tiles = candidates(w0, consume is not None, kind in int8_rows)
            given = [(c, xr if takes_rounded(c) else x) for c in tiles]
            ok = check_all([lambda c=c, g=g: _agrees(g, *mats[0], c, ref) for c, g in given], x.device, ref)
            for c, g in [("reference", x)] + [cg for cg, agreed in zip(given, ok) if agreed]:
                times[c] = graph_ms(lambda c=c, g=g: [(consume or dense)(matmul(g, w, s, b, c)) for w, b, s in mats])
            table[(kind, m)] = best = min(times, key=times.get)
            us = {str(c): round(1e3 * t, 1) for c, t in times.items()}
            report.append({"kind": kind, "rows": m, "chosen": str(best), "us": us})
    for r in report:
        log.info("quantized product %s x%d: %s (%s)", r["kind"], r["rows"], r["chosen"], r["us"])
    return table, report


def _agrees(given, w, b, s, choice, ref: torch.Tensor) -> bool:
    """The choice's product of `given` (x, or x rounded per row where it takes that) equals `ref`,
    the reference on x."""
    # FP8 activations keep 3 mantissa bits: each product term is off by up to 2^-4 relative
    tolerance = 0.1 if takes_rounded(choice) else 2e-2
    product = lambda: dense(matmul(given, w, s, b, choice))
    return agrees(f"quantized product {choice}", product, ref, tolerance)
