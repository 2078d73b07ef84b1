"""A product's input made in the product's own programs: the decode step's residual add + RMSNorm
(`rows.Normed`), read by a small-batch tile (`gemv.small_matmul`) instead of the add + norm kernel.

At a few rows the add + norm kernel is one program whose work is a few microseconds of waiting:
the product before it must finish, then its loads, a row reduction and its stores, then the product
after it may start; PDL hides its launch, not that chain. Here every program of the consuming
product reads the residual stream and the added product (a few KB, from L2) in a prologue, sums
the squares of each row, and makes its input's values per K step as it multiplies; the first
program also writes the updated residual stream, to another buffer (`out`), since the others read
the one it replaces. The values are the add + norm kernel's (the same float32 expressions, the sum
of squares in K steps rather than one reduction, so a row's scale may differ in its last bit), and
where the product multiplies float8 rows it rounds them per row as that kernel does (each row's
absmax in a second pass over the row, from L1/L2).

A product whose sums other programs added with atomics (`gemv.Accumulated`, attention + o) is read
as it is; it cannot be zeroed here (every program reads it), so the decode step alternates two sums
buffers and each such product zeroes the one it does not read (`clear`; forward.py)."""

from __future__ import annotations

import triton
import triton.language as tl

from . import gating

KEY_SUFFIX = "+norm"  # a decode table's key for a kind's tile that makes its input (`key`)
PREFETCH_SUFFIX = " prefetch"  # ... and of the K steps of weight that tile asks L2 for before its prologue
MAX_ROWS = 8  # batches timed for it: beyond, the add + norm kernel is a smaller part of a step (and
# each batch adds compiles to the start-up tuning)


def key(kind: str) -> str:
    """The decode table's key of `kind`'s tile reading a `Normed` input: "qkv_proj+norm"."""
    return kind + KEY_SUFFIX


def readers(table: dict, rows: int) -> tuple[str, ...]:
    """The table keys of a decode step's products that read an add + norm's output at `rows` rows
    (the next qkv, gate_up's tile or the one making its activation, the LM head): the ones that may
    make their input; none where the fused MLP serves these rows (no product could zero its sums
    after reading them)."""
    from . import gemv, mlp

    if (mlp.KEY, rows) in table:
        return ()
    return "qkv_proj", gemv.GLU_KEYS[0] if (gemv.GLU_KEYS[0], rows) in table else "gate_up", "lm_head"


def prefetch_key(kind: str) -> str:
    """The decode table's key of the K steps (an int) that tile's programs ask L2 for once the PDL
    wait is over, before the prologue's round trips to L2 (absent: none)."""
    return key(kind) + PREFETCH_SUFFIX


@triton.jit
def stream(delta, res, rows, k, ok, K, n_split, s_split, ADD: tl.constexpr):
    """The residual stream at rows / columns k after the add, float32 of the value stored in its
    type (as the add + norm kernel stores it): residual + delta, or the residual where not ADD."""
    s = tl.load(res + rows * K + k, mask=ok, other=0.0).to(tl.float32)
    if ADD:
        d = gating.load_product(delta, rows * K + k, ok, n_split, s_split, res)
        s = (d + s).to(res.dtype.element_ty).to(tl.float32)
    return s


@triton.jit
def prologue(delta, res, res_out, w, clear, n_clear, m, m_ok, K, n_split, s_split, eps,
             BLOCK_K: tl.constexpr, ADD: tl.constexpr, QUANT: tl.constexpr, QMAX: tl.constexpr,
             CLEAR: tl.constexpr):  # fmt: skip
    """Per row m: (1 / its RMS after the add, its float8 step: absmax of the normed row / QMAX where
    QUANT, else 1). The grid's first program writes the stream after the add to `res_out`; every
    program zeroes its share of `clear`'s n_clear sums. Call after the PDL wait."""
    first = tl.program_id(0) + tl.program_id(1)  # 0 in the grid's first program
    squares = tl.zeros_like(m).to(tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        ok = m_ok[:, None] & (k < K)[None, :]
        s = stream(delta, res, m[:, None], k[None, :], ok, K, n_split, s_split, ADD)
        if ADD:
            mine = ok & (m[:, None] * 0 + first == 0)  # a tensor: the interpreter masks by tensors alone
            tl.store(res_out + m[:, None] * K + k[None, :], s.to(res_out.dtype.element_ty), mask=mine)
        squares += tl.sum(s * s, axis=1)
    inv = 1.0 / tl.sqrt(squares / K + eps)
    step = tl.full(inv.shape, 1.0, tl.float32)
    if QUANT:  # a second pass: the rounding needs each normed value, which needs the row's scale
        top = tl.zeros_like(inv)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            ok = m_ok[:, None] & (k < K)[None, :]
            x = values(delta, res, w, w, m[:, None], k[None, :], ok, K, n_split, s_split, inv[:, None], 1.0, ADD,
                       False, QMAX)  # fmt: skip
            top = tl.maximum(top, tl.max(tl.abs(x.to(tl.float32)), axis=1))
        step = tl.maximum(top, 1e-12) / QMAX
    if CLEAR:
        _zero_share(clear, n_clear)
    return inv, step


@triton.jit
def _zero_share(sums, n):
    """This program's share of n float32 sums set to zero (the grid's programs split them)."""
    programs = tl.num_programs(0) * tl.num_programs(1)
    me = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    share = tl.cdiv(n, programs)
    for i0 in range(me * share, (me + 1) * share, 256):
        i = i0 + tl.arange(0, 256)
        tl.store(sums + i, tl.zeros([256], tl.float32), mask=(i < n) & (i < (me + 1) * share))


@triton.jit
def values(delta, res, w, q_like, rows, k, ok, K, n_split, s_split, inv, step,
           ADD: tl.constexpr, QUANT: tl.constexpr, QMAX: tl.constexpr):  # fmt: skip
    """The product's input at rows / columns k (2D, or a row and a K step): RMSNorm(residual +
    delta) * w in the activations' type, as the add + norm kernel stores it; where QUANT, that
    divided by the row's `step` and rounded to q_like's float8 type (`fused._store_rows`'s values)."""
    s = stream(delta, res, rows, k, ok, K, n_split, s_split, ADD)
    wk = tl.load(w + k, mask=k < K, other=0.0).to(tl.float32)
    x = (s * inv * wk).to(res.dtype.element_ty)
    if QUANT:
        v = tl.minimum(tl.maximum(x.to(tl.float32) / step, -QMAX), QMAX)
        x = v.to(q_like.dtype.element_ty, fp_downcast_rounding="rtne")
    return x
