"""Fused kernels (OpenAI Triton) for the torch-cuda runtime's decode and prefill: a decode step is otherwise
~390 small kernels whose launch and tail cost exceeds the matrix products at batch 1.

- `rope_kv_write`: rotary on q and k of every head plus the K/V cache write, from the fused qkv
  projection, in one kernel (replaces ~8: slices, rotate_half, muls, adds, two index_puts); for
  a decode token per slot, or a prefill's every token (rows mapped to their slots).
- `add_rms_norm`: residual add (in place) + RMSNorm in one kernel (replaces 2); with Gemma 2/3's
  sandwich norms, the added product is RMS-normed first (replaces 3).
- `activate_mul`: SiLU(gate) * up, or GELU-tanh(gate) * up (GeGLU), in one kernel (replaces 2).
Where the next product is an FP8 GEMM, add + norm and the activation round their output to e4m3
per row themselves (`quantize`): the product's quantize kernel and a round trip of its input go.
Decode attention is in `attention.py`. The kernels that read a matrix product (rotary, add + norm,
activation) also take it as `gemv.SplitK` partial sums and add them up as they load
(`gating.load_product`): a split-K product needs no reduce kernel of its own.
Arithmetic in float32, stored in the activations' type. Checked against the reference ops with
TRITON_INTERPRET=1 on the CPU (tests/parity) and measured on the GPU (bench)."""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from . import gating
from . import pdl as gdc
from .attention import value_strides
from .gemv import Accumulated, SplitK
from .rows import QuantRows

WHOLE_ROW = 16384  # activation widths (Llama-3.1-8B's 14,336) rounded per row from one block in registers
# at every batch size: a row read once, where two passes over it make each program's chain twice as
# long and, at a few programs a SM, leave too few loads in flight (bench.row_kernels)
_two_pass_rounding = False  # set only by `rounding_in_two_passes`, for the benches' comparison
NORM_ROWS = 64  # up to this many rows an add + norm program's warps follow NORM_VALUES:
NORM_VALUES = 8  # row values a thread of an add + norm program holds (the program holds the row), between
NORM_WARPS = (4, 16)  # these warps: at one row the program is the kernel, and fewer values a thread
# shorten its chain of loads, sums and stores (bench.row_kernels); larger batches keep Triton's
# default 4, which they were measured with


@triton.jit
def _rope_kv_kernel(
    qkv,
    cos,
    sin,
    q_out,
    k_out,
    k_cache,
    v_cache,
    table,
    pos,
    row_slot,
    q_w,
    k_w,
    kv_scale,
    eps,
    n_heads,
    n_kv,
    n_split,
    s_split,
    s_qkv,
    s_cs,
    s_qo_b,
    s_qo_h,
    s_table,
    s_c_block,
    s_c_head,
    s_c_pos,
    s_v_pos,
    s_v_d,
    PAGE: tl.constexpr,
    HALF: tl.constexpr,
    HP: tl.constexpr,
    KP: tl.constexpr,
    HAS_SLOTS: tl.constexpr,
    WRITE_K: tl.constexpr,
    QK_NORM: tl.constexpr,
    GEMMA_NORM: tl.constexpr,
    FP8: tl.constexpr,
    PDL: tl.constexpr,
):
    gdc.enter(PDL)
    row = tl.program_id(0)  # one token of one sequence, all its heads: q and k heads as the rows of a tile
    h, j = tl.arange(0, HP)[:, None], tl.arange(0, HALF)[None, :]
    live = (h < n_heads + n_kv) & (j < HALF)
    src = row * s_qkv + h * 2 * HALF + j
    x1 = gating.load_product(qkv, src, live, n_split, s_split, q_out)
    x2 = gating.load_product(qkv, src + HALF, live, n_split, s_split, q_out)
    if QK_NORM:  # Qwen3: each q and k head RMS-normed (rounded as the module rounds), then rotated
        r = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)[:, None]
        is_q_row = h < n_heads
        w1 = tl.where(is_q_row, tl.load(q_w + j).to(tl.float32), tl.load(k_w + j).to(tl.float32))
        w2 = tl.where(is_q_row, tl.load(q_w + HALF + j).to(tl.float32), tl.load(k_w + HALF + j).to(tl.float32))
        if GEMMA_NORM:  # Gemma 3: scaled by the (1 + w) it is given in fp32, rounded once
            x1 = (x1 * r * w1).to(q_out.dtype.element_ty).to(tl.float32)
            x2 = (x2 * r * w2).to(q_out.dtype.element_ty).to(tl.float32)
        else:
            x1 = ((x1 * r).to(q_out.dtype.element_ty).to(tl.float32) * w1).to(q_out.dtype.element_ty).to(tl.float32)
            x2 = ((x2 * r).to(q_out.dtype.element_ty).to(tl.float32) * w2).to(q_out.dtype.element_ty).to(tl.float32)
    c1, c2 = tl.load(cos + row * s_cs + j).to(tl.float32), tl.load(cos + row * s_cs + HALF + j).to(tl.float32)
    s1, s2 = tl.load(sin + row * s_cs + j).to(tl.float32), tl.load(sin + row * s_cs + HALF + j).to(tl.float32)
    y1 = x1 * c1 - x2 * s1
    y2 = x2 * c2 + x1 * s2
    is_q = live & (h < n_heads)
    dst = q_out + row * s_qo_b + h * s_qo_h + j
    tl.store(dst, y1.to(q_out.dtype.element_ty), mask=is_q)
    tl.store(dst + HALF, y2.to(q_out.dtype.element_ty), mask=is_q)
    slot = tl.load(row_slot + row) if HAS_SLOTS else row
    p = tl.load(pos + row)
    block = tl.load(table + slot * s_table + p // PAGE).to(tl.int64)  # the paged cache's block of p
    at = block * s_c_block + (p % PAGE) * s_c_pos
    at_v = block * s_c_block + (p % PAGE) * s_v_pos
    is_k, kv = live & (h >= n_heads), h - n_heads
    k1, k2 = y1, y2
    if FP8:  # divided by the head's scale, saturated at e4m3's largest
        ks = tl.load(kv_scale + kv, mask=(h >= n_heads) & (h < n_heads + n_kv), other=1.0)
        k1, k2 = tl.clamp(y1 / ks, -448.0, 448.0), tl.clamp(y2 / ks, -448.0, 448.0)
    tl.store(k_cache + at + kv * s_c_head + j, k1.to(k_cache.dtype.element_ty), mask=is_k)
    tl.store(k_cache + at + kv * s_c_head + HALF + j, k2.to(k_cache.dtype.element_ty), mask=is_k)
    if WRITE_K:
        kdst = k_out + (row * n_kv + kv) * 2 * HALF + j
        tl.store(kdst, y1.to(k_out.dtype.element_ty), mask=is_k)
        tl.store(kdst + HALF, y2.to(k_out.dtype.element_ty), mask=is_k)
    g, d = tl.arange(0, KP)[:, None], tl.arange(0, 2 * HALF)[None, :]  # v heads: copied as they are
    v_live = (g < n_kv) & (d < 2 * HALF)
    v = gating.load_product(qkv, row * s_qkv + (n_heads + n_kv + g) * 2 * HALF + d, v_live, n_split, s_split, q_out)
    if FP8:
        v = tl.clamp(v / tl.load(kv_scale + n_kv + g, mask=g < n_kv, other=1.0), -448.0, 448.0)
    tl.store(v_cache + at_v + g * s_c_head + d * s_v_d, v.to(v_cache.dtype.element_ty), mask=v_live)


def rope_kv_write(
    qkv: torch.Tensor | SplitK,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    table: torch.Tensor,
    positions: torch.Tensor,
    n_heads: int,
    n_kv: int,
    slots: torch.Tensor | None = None,
    return_k: bool = False,
    qk_norm: tuple[torch.Tensor, torch.Tensor, float, bool] | None = None,
    kv_scale: torch.Tensor | None = None,
    pdl: bool = False,
):
    """qkv [..., (H+2Hkv)*D] (or its split partial sums): R token rows, row r at positions[r] of
    cache slot slots[r] (default: slot r, one decode token per slot); cos/sin [..., D] per row;
    k/v_cache [blocks,Hkv,PAGE,D] (one layer; the values written through their strides) behind the
    block table [slots, blocks per sequence] (int32). Writes rotated k and v into the caches; returns rotated
    q [R,H,D], and with `return_k` also the rotated k [R,Hkv,D] (what a prefill attends to).
    `qk_norm`: (q scale [D], k scale [D], eps, gemma) of an RMSNorm over each head before the
    rotary; gemma: the scales are Gemma's fp32 (1 + w), applied before the one rounding.
    `kv_scale` [2, Hkv] (float32): the caches are fp8, k and v stored divided by their head's scale.
    `pdl`: launched with programmatic dependent launch (kernels/pdl.py), as are the other kernels here."""
    parts, n_split, s_split, dtype = gating.parts(qkv)
    rows, d = parts.shape[1], k_cache.shape[-1]
    cos, sin = cos.reshape(-1, d), sin.reshape(-1, d)
    q = torch.empty((rows, n_heads, d), dtype=dtype, device=parts.device)
    k = torch.empty((rows, n_kv, d), dtype=dtype, device=parts.device) if return_k else q
    _rope_kv_kernel[(rows,)](
        parts,
        cos,
        sin,
        q,
        k,
        k_cache,
        v_cache,
        table,
        positions,
        slots if slots is not None else positions,
        qk_norm[0] if qk_norm else cos,
        qk_norm[1] if qk_norm else cos,
        kv_scale if kv_scale is not None else cos,
        qk_norm[2] if qk_norm else 0.0,
        n_heads,
        n_kv,
        n_split,
        s_split,
        parts.stride(1),
        cos.stride(0),
        q.stride(0),
        q.stride(1),
        table.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        *value_strides(k_cache, v_cache, k_cache.shape[2]),
        PAGE=k_cache.shape[2],
        HALF=d // 2,
        HP=triton.next_power_of_2(n_heads + n_kv),
        KP=max(2, triton.next_power_of_2(n_kv)),
        HAS_SLOTS=slots is not None,
        WRITE_K=return_k,
        QK_NORM=qk_norm is not None,
        GEMMA_NORM=bool(qk_norm and qk_norm[3]),
        FP8=kv_scale is not None,
        **gdc.launch(pdl),
    )
    return (q, k) if return_k else q


@triton.jit
def _store_rows(out, scale_out, row, i, m, y, s_out, QUANT: tl.constexpr, QMAX: tl.constexpr):
    """Stores a row of activations `y` (already in their type): as they are, or with QUANT divided
    by the row's absmax / QMAX and rounded to out's 8-bit type (qmatmul.quantize_rows' values)."""
    if QUANT:
        v = y.to(tl.float32)
        step = tl.maximum(tl.max(tl.abs(v), axis=0), 1e-12) / QMAX
        tl.store(scale_out + row, step)
        v = tl.minimum(tl.maximum(v / step, -QMAX), QMAX)
        tl.store(out + row * s_out + i, v.to(out.dtype.element_ty, fp_downcast_rounding="rtne"), mask=m)
    else:
        tl.store(out + row * s_out + i, y, mask=m)


@triton.jit
def _add_rms_norm_kernel(
    x,
    residual,
    weight,
    pre_weight,
    out,
    scale_out,
    n,
    eps,
    n_split,
    s_split,
    BLOCK: tl.constexpr,
    PRE: tl.constexpr,
    QUANT: tl.constexpr,
    QMAX: tl.constexpr,
    PDL: tl.constexpr,
    CLEAR: tl.constexpr = False,
    ADD: tl.constexpr = True,
):
    gdc.enter(PDL)
    row = tl.program_id(0)
    i = tl.arange(0, BLOCK)
    m = i < n
    s = tl.load(residual + row * n + i, mask=m, other=0.0).to(tl.float32)
    if ADD:  # else the residual stream's norm alone (a step's first layer)
        y = gating.load_product(x, row * n + i, m, n_split, s_split, residual)
        if CLEAR:  # sums added by atomics (`Accumulated`): zero for the next product adding into them
            tl.store(x + row * n + i, tl.zeros_like(y), mask=m)
        if PRE:  # the product RMS-normed before it is added, rounded as the module rounds it
            y = y / tl.sqrt(tl.sum(y * y, axis=0) / n + eps) * tl.load(pre_weight + i, mask=m, other=0.0).to(tl.float32)
            y = y.to(residual.dtype.element_ty).to(tl.float32)
        s_stored = (y + s).to(residual.dtype.element_ty)
        tl.store(residual + row * n + i, s_stored, mask=m)
        s = s_stored.to(tl.float32)  # normalise what the residual stream holds
    inv = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / n + eps)
    w = tl.load(weight + i, mask=m, other=0.0).to(tl.float32)
    _store_rows(out, scale_out, row, i, m, (s * inv * w).to(residual.dtype.element_ty), n, QUANT, QMAX)


def _output(shape: torch.Size, dtype: torch.dtype, device, quantize: torch.dtype | None):
    """(the kernel's output: activations, or QuantRows where `quantize`, its store arguments)."""
    if quantize is None:
        out = torch.empty(shape, dtype=dtype, device=device)
        return out, (out, out, torch.finfo(torch.float8_e4m3fn).max)
    rows = QuantRows.empty(shape, dtype, quantize, device)
    return rows, (rows.q, rows.scale, torch.finfo(quantize).max)


@contextlib.contextmanager
def rounding_in_two_passes():
    """Within: the rounding activation goes over each row twice even where one block holds it (what
    `bench.row_kernels` and `bench.profile_step` compare the one-block form with)."""
    global _two_pass_rounding
    saved, _two_pass_rounding = _two_pass_rounding, True
    try:
        yield
    finally:
        _two_pass_rounding = saved


def norm_warps(n: int, rows: int = 1) -> int:
    """Warps of an add + norm program over `rows` rows of n values."""
    low, high = NORM_WARPS
    if rows > NORM_ROWS:
        return low
    return min(high, max(low, triton.next_power_of_2(n) // (32 * NORM_VALUES)))


def add_rms_norm(
    x: torch.Tensor | SplitK | None,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    pre_weight: torch.Tensor | None = None,
    quantize: torch.dtype | None = None,
    pdl: bool = False,
) -> torch.Tensor | QuantRows:
    """residual += x (in place), or += RMSNorm(x) * pre_weight (Gemma 2/3's norm on a layer's
    outputs); returns RMSNorm(residual) * weight. Contiguous [..., E] tensors (x may be a product's
    split partial sums); the weights are the scales applied in fp32 (Gemma's 1 + w). `quantize`
    (e4m3): the result rounded per row for an FP8 GEMM (`QuantRows`) instead. `Accumulated` sums
    are zeroed once read. x None: RMSNorm(residual) * weight alone (residual unchanged)."""
    parts, n_split, s_split, _ = gating.parts(residual if x is None else x)  # (x None: unread, any pointer)
    n = residual.shape[-1]
    result, (out, scale_out, qmax) = _output(residual.shape, residual.dtype, residual.device, quantize)
    pre = pre_weight if pre_weight is not None else weight
    _add_rms_norm_kernel[(residual.numel() // n,)](
        parts,
        residual,
        weight,
        pre,
        out,
        scale_out,
        n,
        eps,
        n_split,
        s_split,
        BLOCK=triton.next_power_of_2(n),
        PRE=pre_weight is not None,
        QUANT=quantize is not None,
        QMAX=qmax,
        CLEAR=isinstance(x, Accumulated),
        ADD=x is not None,
        num_warps=norm_warps(n, residual.numel() // n),
        **gdc.launch(pdl),
    )
    return result


@triton.jit
def _activate_mul_kernel(gate_up, out, f, n_split, s_split, BLOCK: tl.constexpr, GELU: tl.constexpr, PDL: tl.constexpr):
    gdc.enter(PDL)
    row, blk = tl.program_id(0), tl.program_id(1)
    i = blk * BLOCK + tl.arange(0, BLOCK)
    m = i < f
    tl.store(out + row * f + i, gating.gated(gate_up, row, i, m, f, n_split, s_split, out, GELU), mask=m)


@triton.jit
def _activate_mul_rows_kernel(
    gate_up,
    like,
    q,
    scale,
    f,
    n_split,
    s_split,
    BLOCK: tl.constexpr,
    GELU: tl.constexpr,
    QMAX: tl.constexpr,
    PDL: tl.constexpr,
    WHOLE: tl.constexpr = False,
):
    """A whole row per program, rounded per row to q's 8-bit type. WHOLE (BLOCK covers the row):
    read once, its absmax taken in registers. Else its absmax first, then the row again (from L2)
    divided by it, the values computed twice rather than stored and re-read: at a few rows such a
    program's two passes are a decode step's longest chain, hence WHOLE (`WHOLE_ROW`)."""
    gdc.enter(PDL)
    row = tl.program_id(0)
    if WHOLE:
        i = tl.arange(0, BLOCK)
        y = gating.gated(gate_up, row, i, i < f, f, n_split, s_split, like, GELU)
        _store_rows(q, scale, row, i, i < f, y, f, True, QMAX)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, f, BLOCK):
            i = k0 + tl.arange(0, BLOCK)
            v = gating.gated(gate_up, row, i, i < f, f, n_split, s_split, like, GELU).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(v))
        step = tl.maximum(tl.max(amax, axis=0), 1e-12) / QMAX
        tl.store(scale + row, step)
        for k0 in range(0, f, BLOCK):
            i = k0 + tl.arange(0, BLOCK)
            v = gating.gated(gate_up, row, i, i < f, f, n_split, s_split, like, GELU).to(tl.float32) / step
            v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
            tl.store(q + row * f + i, v.to(q.dtype.element_ty, fp_downcast_rounding="rtne"), mask=i < f)


def activate_mul(
    gate_up: torch.Tensor | SplitK, activation: str = "silu", quantize: torch.dtype | None = None, pdl: bool = False
) -> torch.Tensor | QuantRows:
    """[..., 2F] (gate then up; or its split partial sums [S, rows, 2F]) -> act(gate) * up [..., F]
    ([rows, 1, F] from partial sums); act: "silu" or "gelu_tanh" (GeGLU). `quantize` (e4m3): the
    result rounded per row for an FP8 GEMM (`QuantRows`) instead."""
    gelu = gating.check_activation(activation, "activate_mul")
    parts, n_split, s_split, dtype = gating.parts(gate_up)
    f, rows = parts.shape[-1] // 2, parts.shape[1]
    lead = gate_up.shape[:-1] if isinstance(gate_up, torch.Tensor) else (rows, 1)
    result, (out, scale_out, qmax) = _output(torch.Size((*lead, f)), dtype, parts.device, quantize)
    block = 1024
    if quantize is None:
        _activate_mul_kernel[(rows, triton.cdiv(f, block))](
            parts, out, f, n_split, s_split, BLOCK=block, GELU=gelu, **gdc.launch(pdl)
        )
        return result
    like = gating.like(parts, dtype)
    shape = {"BLOCK": block}
    if f <= WHOLE_ROW and not _two_pass_rounding:
        whole = triton.next_power_of_2(f)
        shape = dict(BLOCK=whole, WHOLE=True, num_warps=16 if whole > 8192 else 8)
    _activate_mul_rows_kernel[(rows,)](
        parts, like, out, scale_out, f, n_split, s_split, GELU=gelu, QMAX=qmax, **shape, **gdc.launch(pdl)
    )
    return result
