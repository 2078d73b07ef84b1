"""Matrix products for decode batches of a few rows (OpenAI Triton), chosen per weight by timing.

At batch 1 cuBLAS tiles a weight's output rows 64 at a time, so a 2048-row projection runs as 32
programs on a GPU of 132 SMs, far below the copy bandwidth (docs/decisions.md). `gemv` gives each
program a few output rows over the whole input, so even a 2048-row weight is read by hundreds of
programs at once; `skinny_dot` does the same on the tensor cores for up to 64 rows (a narrow tile
of the weight per program), optionally split along K where cuBLAS's few output tiles would leave SMs
idle. A split product is left as `SplitK` partial sums that the next fused kernel adds up as it
loads them (no reduce kernel). Which of cuBLAS and a few tile shapes serves each (weight kind,
batch rows) is timed on the GPU itself at start-up (`tune`), on every layer's weight in turn as a
decode step reads them (a single weight would sit in L2 and flatter the small tiles)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import gating, normed
from . import pdl as gdc
from .rows import Normed, QuantRows

log = logging.getLogger(__name__)
MAX_ROWS = 8  # batch rows a gemv program holds beside its weight tile
MAX_DOT_ROWS = 64  # up to here `skinny_dot` (tensor cores, a narrow tile of W per program); beyond, cuBLAS
# (rows of W, K step, warps): the candidates start-up timing chooses from (docs/decisions.md: gemv tiles)
CONFIGS = ((4, 1024, 4), (2, 1024, 4), (2, 2048, 4), (1, 2048, 4), (1, 4096, 4))
DOT_CONFIGS = (
    (16, 128, 4, 4),
    (32, 128, 4, 4),
    (64, 64, 4, 4),
    (32, 256, 8, 3),
    (64, 128, 4, 3),
)  # (rows of W, K step, warps, stages)
# 8-bit weights (model/quant.py): the same programs read half the bytes per tile, so the candidates
# reach further along K to keep as many bytes in flight
QUANT_CONFIGS = CONFIGS + ((2, 4096, 4), (4, 4096, 8), (1, 8192, 8), (2, 8192, 8), (8, 2048, 8))
QUANT_DOT_CONFIGS = DOT_CONFIGS + ((16, 256, 4, 4), (32, 256, 4, 4), (64, 256, 8, 3), (32, 512, 8, 3))
SPLITS = (1, 2, 4, 8)  # slices of K a skinny_dot may run as separate programs (a 5th number in its config)
SPLIT_TILES = ((32, 128, 4, 4), (64, 64, 4, 4))  # the tiles tried split (the others never won split)
# float8 weights at a few rows: the activations rounded to float8 per K step (a 6th number, 1), so
# the tensor cores multiply 8 bits by 8 bits and no weight is widened in registers; each tile also
# split along K, as a weight of few output rows (4096) gives too few programs to fill the SMs
X8_TILES = ((32, 256, 4, 4), (64, 256, 4, 3), (64, 128, 4, 4))
X8_TOLERANCE = 0.1  # float8 activations keep 3 mantissa bits: each term is off by up to 2^-4 relative
# The same float8 tiles with the operands swapped (a 7th number, 1): the weight tile is the tensor
# cores' wide operand (64-128 of its rows) and the few rows of x the narrow one, as CUTLASS's
# small-batch FP8 kernels do, so Hopper's warpgroup products (64+ rows a side) can serve a batch
# of 1-64 rows (x padded to 16+ rows as the narrow side)
SWAP_TILES = ((64, 256, 4, 3), (128, 256, 8, 3))
SWAP_WIDE_TILES = ((64, 128, 4, 3), (128, 128, 8, 3))  # swapped, 16-bit weights or 8-bit ones widened (6th number 0)
# float8 weights whose input its producer rounds per row (`QuantRows`, as it does for the FP8 GEMM):
# 8-bit x 8-bit tiles (a 6th number 2) with no rounding and no absmax in the K loop, the row scales
# applied once at the end: the X8 tiles unswapped (rows of x as the first operand) and SWAP_TILES
ROUNDED_TILES = ((64, 256, 4, 3, 0), (64, 128, 4, 4, 0), (64, 256, 4, 3, 1), (128, 256, 8, 3, 1))  # 5th: swapped
X_AS_GIVEN, X_ROUNDED_PER_STEP, X_ROUNDED_PER_ROW = 0, 1, 2  # a config's 6th number
Config = tuple[int, ...]  # 3 numbers: gemv, 4: skinny_dot, 5: split along K, 6: float8 activations, 7: swapped
FP8_GEMM = "fp8"  # a table entry that is no tile: the FP8 Tensor Core GEMM (`qmatmul.fp8_matmul`) serves


@dataclass(frozen=True)
class SplitK:
    """A product left as float32 partial sums `parts` [S, rows, N] over S slices of K; the
    consumer adds them up and rounds to `dtype` (the activations' type, as an unsplit product's
    output is rounded)."""

    parts: torch.Tensor
    dtype: torch.dtype

    def total(self) -> torch.Tensor:
        """The product itself [rows, N] (for a consumer that cannot read partial sums)."""
        return self.parts.sum(0).to(self.dtype)


class Accumulated(SplitK):
    """A product whose programs added their partial sums into one float32 slice with atomic adds
    (`mlp.fused_mlp`): its one consumer reads the sums and zeroes them, so the buffer is ready for
    the next product that adds into it."""


class Gated(NamedTuple):
    """A gated MLP's input to its down product: gate_up's product [..., 2F] (gate then up; or its
    `SplitK` partial sums) that the product turns into act(gate) * up [..., F] as it loads each K
    step, rounded to the activations' type as the activation kernel rounds it: that kernel (a
    launch and a round trip of its output, per layer of a decode step) goes."""

    product: torch.Tensor | SplitK
    activation: str  # gating.ACTIVATIONS

    @property
    def shape(self) -> torch.Size:
        """The activation's shape, as `fused.activate_mul` gives it."""
        values, _, _, _ = gating.parts(self.product)
        lead = self.product.shape[:-1] if isinstance(self.product, torch.Tensor) else (values.shape[1], 1)
        return torch.Size((*lead, values.shape[-1] // 2))


@triton.jit
def _tile_product(xt, wt, QUANT_X: tl.constexpr, SWAP: tl.constexpr):
    """One K step's product of x's rows `xt` [M, K] and a weight tile `wt` [N, K] on the tensor
    cores: [M, N], or [N, M] where SWAP (the weight as the wide operand)."""
    # one return: Triton types every return of a function, constexpr branches or not
    if QUANT_X:  # float8 x float8, each row of this K step scaled by its absmax
        amax = tl.maximum(tl.max(tl.abs(xt.to(tl.float32)), axis=1), 1e-30)
        xq = (xt.to(tl.float32) * (448.0 / amax)[:, None]).to(wt.dtype)  # 448: float8 e4m3's largest
        if SWAP:
            y = tl.dot(wt, tl.trans(xq)) * (amax / 448.0)[None, :]
        else:
            y = tl.dot(xq, tl.trans(wt)) * (amax / 448.0)[:, None]
    elif SWAP:  # an 8-bit weight widened in registers, exactly
        y = tl.dot(wt.to(xt.dtype), tl.trans(xt))
    else:
        y = tl.dot(xt, tl.trans(wt.to(xt.dtype)))
    return y


@triton.jit
def _small_matmul_kernel(
    x,
    x_scale,
    w,
    bias,
    w_scale,
    out,
    like,
    M,
    N,
    K,
    K_SPLIT,
    s_xm,
    s_wn,
    s_os,
    s_om,
    n_split,
    s_split,
    res,
    res_out,
    norm_w,
    clear,
    n_clear,
    eps,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    USE_DOT: tl.constexpr,
    QUANT_X: tl.constexpr,
    SWAP: tl.constexpr,
    GATED: tl.constexpr,
    GELU: tl.constexpr,
    GLU: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
    PREFETCH: tl.constexpr,
    ELEM: tl.constexpr,
    NORMED: tl.constexpr = False,
    ADD: tl.constexpr = False,
    CLEAR: tl.constexpr = False,
    QMAX: tl.constexpr = 448.0,
):
    split = tl.program_id(1)  # this program's slice of K: [split * K_SPLIT, (split + 1) * K_SPLIT)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    n_ok, m_ok = n < N, m < M
    if PREFETCH:
        if not NORMED:  # the weight's first bytes stream into L2 while the kernel before finishes
            gdc.prefetch_rows(w, n, n_ok, s_wn, split * K_SPLIT, K, PREFETCH, ELEM)
    gdc.enter(PDL)
    if PREFETCH:
        if NORMED:  # ... while the prologue below waits on L2 (DRAM idle), the kernel before done
            gdc.prefetch_rows(w, n, n_ok, s_wn, split * K_SPLIT, K, PREFETCH, ELEM)
    inv = tl.zeros([BLOCK_M], tl.float32)
    if NORMED:  # x is made here: RMSNorm(residual + product) * norm_w (`rows.Normed`)
        inv, row_scale = normed.prologue(x, res, res_out, norm_w, clear, n_clear, m, m_ok, K, n_split, s_split, eps,
                                         BLOCK_K, ADD, QUANT_X == 2, QMAX, CLEAR)  # fmt: skip
    else:
        row_scale = row_scales(x_scale, m, m_ok, QUANT_X)
    if SWAP:  # the accumulator kept as the swapped product gives it, turned once at the end
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros_like(acc)  # GLU: the same tile of the up rows (N further on), unused otherwise
    for k0 in range(split * K_SPLIT, (split + 1) * K_SPLIT, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        if USE_DOT:
            ok = m_ok[:, None] & k_ok[None, :]
            if NORMED:
                xt = normed.values(x, res, norm_w, w, m[:, None], k[None, :], ok, K, n_split, s_split, inv[:, None],
                                   row_scale[:, None], ADD, QUANT_X == 2, QMAX)  # fmt: skip
            else:
                xt = _x_values(x, m[:, None], k[None, :], ok, s_xm, K, n_split, s_split, like, GATED, GELU)
            acc += _k_step(xt, w, n, n_ok, k, k_ok, s_wn, QUANT_X, SWAP)
            if GLU:
                acc_up += _k_step(xt, w, n + N, n_ok, k, k_ok, s_wn, QUANT_X, SWAP)
        else:
            acc = _rows_step(acc, x, w, m, M, n, n_ok, k, k_ok, s_xm, s_wn, K, n_split, s_split, like, GATED, GELU,
                             res, norm_w, inv, NORMED, ADD)  # fmt: skip
            if GLU:
                acc_up = _rows_step(acc_up, x, w, m, M, n + N, n_ok, k, k_ok, s_xm, s_wn, K, n_split, s_split, like,
                                    GATED, GELU, res, norm_w, inv, NORMED, ADD)  # fmt: skip
    y = _finish(acc, row_scale, w_scale, bias, m, m_ok, n, n_ok, split, SWAP, QUANT_X, HAS_SCALE, HAS_BIAS)
    if GLU:  # act(gate) * up, rounded as the activation kernel rounds gate_up's stored product
        up = _finish(acc_up, row_scale, w_scale, bias, m, m_ok, n + N, n_ok, split, SWAP, QUANT_X, HAS_SCALE, HAS_BIAS)
        ty = out.dtype.element_ty
        y = gating.glu(y.to(ty).to(tl.float32), up.to(ty).to(tl.float32), out, GELU)
    tl.store(
        out + split * s_os + m[:, None] * s_om + n[None, :],
        y.to(out.dtype.element_ty),
        mask=m_ok[:, None] & n_ok[None, :],
    )


@triton.jit
def _w_tile(w, n, n_ok, k, k_ok, s_wn):
    return tl.load(w + n[:, None] * s_wn + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)


@triton.jit
def _k_step(xt, w, n, n_ok, k, k_ok, s_wn, QUANT_X: tl.constexpr, SWAP: tl.constexpr):
    """One K step's product of x's rows `xt` and the weight's rows `n` on the tensor cores: [M, N]
    ([N, M] where SWAP)."""
    return _tile_product(xt, _w_tile(w, n, n_ok, k, k_ok, s_wn), QUANT_X == 1, SWAP)


@triton.jit
def _x_values(x, rows, k, ok, s_xm, K, n_split, s_split, like, GATED: tl.constexpr, GELU: tl.constexpr):
    """x at `rows` and columns k (either 2D, or a row and a K step), or where GATED (x is gate_up's
    product in n_split slices) the activation act(gate) * up there, made here."""
    if GATED:
        v = gating.gated(x, rows, k, ok, K, n_split, s_split, like, GELU)
    else:
        v = tl.load(x + rows * s_xm + k, mask=ok, other=0.0)
    return v


@triton.jit
def _rows_step(acc, x, w, m, M, n, n_ok, k, k_ok, s_xm, s_wn, K, n_split, s_split, like,
               GATED: tl.constexpr, GELU: tl.constexpr, res, norm_w, inv, NORMED: tl.constexpr,
               ADD: tl.constexpr):  # fmt: skip
    """gemv's K step on the CUDA cores, acc [M, N] plus each row of x against the weight tile in the
    tile's own 2D layout: a row's K step loaded as a vector for it. (Rows as one [M, K] tile broadcast
    to [M, N, K] pass each K step of x through shared memory, ~1.4-2x the instructions.) Where
    NORMED, x is made from the residual, the norm weight and each row's 1 / RMS `inv` (`normed`)."""
    wt = _w_tile(w, n, n_ok, k, k_ok, s_wn).to(tl.float32)
    for r in tl.static_range(m.shape[0]):
        row_ok = tl.full(k.shape, r, tl.int32) < M  # a tensor: the interpreter masks by tensors alone
        if NORMED:
            inv_r = tl.sum(tl.where(m == r, inv, 0.0), axis=0)
            xr = normed.values(x, res, norm_w, w, r, k, k_ok & row_ok, K, n_split, s_split, inv_r, 1.0, ADD, False, 1.0)
        else:
            xr = _x_values(x, r, k, k_ok & row_ok, s_xm, K, n_split, s_split, like, GATED, GELU)
        xr = xr.to(tl.float32)
        y = tl.sum(wt * xr[None, :], axis=1)
        if m.shape[0] == 1:
            acc += y[None, :]
        else:
            acc += tl.where(m[:, None] == r, y[None, :], 0.0)
    return acc


@triton.jit
def row_scales(x_scale, m, m_ok, QUANT_X: tl.constexpr):
    """Each row m's scale where its producer rounded x per row (QUANT_X 2), else zeros (unread)."""
    if QUANT_X == 2:
        return tl.load(x_scale + m, mask=m_ok, other=0.0)
    return tl.zeros(m.shape, tl.float32)


@triton.jit
def _finish(acc, row_scale, w_scale, bias, m, m_ok, n, n_ok, split,
            SWAP: tl.constexpr, QUANT_X: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr):  # fmt: skip
    """A program's accumulated sums of the weight's rows `n` as the product's values [M, N], float32:
    turned where SWAP, times the rows' scales (`row_scale`) and channels', plus the bias (in the
    first slice)."""
    if SWAP:
        acc = tl.trans(acc)
    if QUANT_X == 2:  # x rounded per row: each row's products times its scale
        acc *= row_scale[:, None]
    if HAS_SCALE:  # per output channel: (x @ q.T) * scale == x @ (q * scale).T
        acc *= tl.load(w_scale + n, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        if split == 0:
            acc += tl.load(bias + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    return acc


def small_matmul(
    x: torch.Tensor | QuantRows | Gated | Normed,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    config: Config,
    scale: torch.Tensor | None = None,
    pdl_steps: int | None = None,
    glu: str | None = None,
) -> torch.Tensor | SplitK:
    """x [..., K], weight [N, K] (nn.Linear layout) -> x @ weight.T + bias [..., N], float32
    accumulation, each program computing every row for a narrow tile of the weight's rows.
    A 3-number config (rows of W, K step, warps) is `gemv`: at most MAX_ROWS rows, its K step
    shrinking as rows grow (a program holds rows x tile). A 4-number one (..., stages) is
    `skinny_dot`: at most MAX_DOT_ROWS rows on the tensor cores; a 5th number S > 1 splits K into S
    slices, each its own programs, and returns their `SplitK` partial sums; a 6th number (float8
    weights only) 1 rounds x to float8 per K step and row for 8-bit x 8-bit products, 2 takes x
    already rounded per row (`QuantRows`); a 7th number 1 swaps the operands (the weight tile
    first, SWAP_TILES). x may be `Gated` (gate_up's product, the activation made as it loads) for
    any config that does not take rows rounded per row. With `scale` [N] the weight is 8-bit
    (int8 or float8, model/quant.py) and the product is x @ (weight * scale).T: the weight streams
    at a byte per value. `pdl_steps` (not None): launched with PDL (`pdl`), each program first
    asking L2 for that many K steps of its weight tile. `glu` (an activation of `gating.ACTIVATIONS`):
    the weight is gate_up's [2F, K] (gate rows, then up rows) and the product returned is act(x @
    gate.T) * (x @ up.T) [..., F], each program making both tiles of its columns (unsplit configs
    only): the activation kernel and the round trip of gate_up's product go. x may also be `Normed`
    (the residual add + RMSNorm made in the product's programs, rounded per row where the config
    takes rows so): the add + norm kernel goes."""
    use_dot = len(config) >= 4
    splits = config[4] if len(config) >= 5 else 1
    given = _operands(x, weight, config)
    rows, k = given.shape.numel() // given.shape[-1], given.shape[-1]
    limit, name = (MAX_DOT_ROWS, "skinny_dot") if use_dot else (MAX_ROWS, "gemv")
    if rows > limit:
        raise ValueError(f"{name} takes at most {limit} rows, got {rows}: use the matmul")
    n, device = weight.shape[0] // (2 if glu else 1), weight.device
    gelu = gating.check_activation(glu, "small_matmul's glu") if glu else bool(given.gelu)
    if glu and (splits > 1 or given.gelu is not None):
        raise ValueError(f"config {config}, glu={glu!r}: the activation needs whole sums of a plain x: unsplit only")
    out = torch.empty((splits, rows, n), dtype=given.dtype if splits == 1 else torch.float32, device=device)
    block_n, block_k, warps, stages = config[:4] if use_dot else (*config, None)
    block_m = max(16, triton.next_power_of_2(rows)) if use_dot else triton.next_power_of_2(rows)
    if not use_dot:
        block_k = max(64, block_k // block_m)
    opts = {"num_warps": warps} if stages is None else {"num_warps": warps, "num_stages": stages}
    k_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k  # whole K steps per slice
    elem = weight.element_size()
    if pdl_steps is not None and isinstance(x, Normed) and x.prefetch:
        pdl_steps = x.prefetch  # (asked once the wait is over: see the kernel)
    lines = gdc.prefetch_lines(k_split, block_k, elem, pdl_steps) if pdl_steps else 0
    _small_matmul_kernel[(triton.cdiv(n, block_n), splits)](
        given.values,
        given.scale,
        weight,
        bias if bias is not None else weight,
        scale if scale is not None else weight,
        out,
        given.like,
        rows,
        n,
        k,
        k_split,
        given.values.stride(-2),
        weight.stride(0),
        out.stride(0),
        out.stride(1),
        given.n_split,
        given.s_split,
        *_norm_args(given.norm, weight),
        HAS_BIAS=bias is not None,
        HAS_SCALE=scale is not None,
        USE_DOT=use_dot,
        QUANT_X=given.mode,
        SWAP=len(config) == 7 and config[6] == 1,
        GATED=given.gelu is not None,
        GELU=gelu,
        GLU=glu is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        PREFETCH=lines,
        ELEM=elem,
        NORMED=given.norm is not None,
        ADD=given.norm is not None and given.norm.delta is not None,
        CLEAR=given.norm is not None and given.norm.clear is not None,
        **gdc.launch(pdl_steps is not None),
        **opts,
    )
    if splits > 1:
        return SplitK(out, given.dtype)
    return out.view(*given.shape[:-1], n)


def x_mode(config: Config) -> int:
    """What a config does with x: X_AS_GIVEN, X_ROUNDED_PER_STEP or X_ROUNDED_PER_ROW (its 6th number)."""
    return config[5] if len(config) >= 6 else X_AS_GIVEN


class _Input(NamedTuple):
    """x as the kernel reads it: `values` (rows of K with unit stride, or gate_up's product
    [S, rows, 2F] where gated), its row scales (any tensor where it has none), x's shape and dtype,
    the config's treatment of x (`x_mode`), and for a gated x its slices, their stride, a tensor of
    the activations' type and whether the activation is GeGLU (`gelu` None: x is not gated); for x
    made by the product (`norm`), the added product's values and slices."""

    values: torch.Tensor
    scale: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    mode: int
    n_split: int = 1
    s_split: int = 0
    like: torch.Tensor | None = None
    gelu: bool | None = None
    norm: Normed | None = None


def _operands(x: torch.Tensor | QuantRows | Gated | Normed, weight: torch.Tensor, config: Config) -> _Input:
    """x as the kernel reads it: a config that rounds x to float8 needs float8 weights, one that
    takes x rounded per row needs it so (`QuantRows`, or `Normed`: the kernel rounds the rows it
    makes) and no other config does, and a gated x is made per K step (never rounded per row: no
    kernel saw the whole row)."""
    quant_x = x_mode(config)
    if quant_x != X_AS_GIVEN and weight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"config {config} multiplies float8 activations: it needs float8 weights, got {weight.dtype}")
    if isinstance(x, Gated):
        if quant_x == X_ROUNDED_PER_ROW:
            raise ValueError(f"config {config} takes rows rounded per row; a gated input is not: use another tile")
        gelu = gating.check_activation(x.activation, "a gated product's input")
        values, n_split, s_split, dtype = gating.parts(x.product)
        like = gating.like(values, dtype)
        return _Input(values, values, x.shape, dtype, quant_x, n_split, s_split, like, gelu)
    if isinstance(x, Normed):
        norm = x.checked()
        values, n_split, s_split, _ = gating.parts(norm.delta if norm.delta is not None else norm.residual)
        res = norm.residual
        return _Input(values, values, res.shape, res.dtype, quant_x, n_split, s_split, res, None, norm)
    if (quant_x == X_ROUNDED_PER_ROW) != isinstance(x, QuantRows):
        given = "rows rounded to float8 (QuantRows)" if isinstance(x, QuantRows) else f"a {x.dtype} tensor"
        raise ValueError(f"config {config} and its input disagree: got {given}; a 6th number 2 takes QuantRows")
    if isinstance(x, QuantRows):
        return _Input(x.q, x.scale, x.shape, x.dtype, quant_x, like=x.q)
    x2 = x.reshape(-1, x.shape[-1])
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    return _Input(x2, x2, x.shape, x.dtype, quant_x, like=x2)


def _norm_args(norm: Normed | None, weight: torch.Tensor) -> tuple:
    """The kernel's (residual, its output, norm weight, sums to zero, their count, eps) for x made
    by the product, else placeholders it never reads."""
    if norm is None:
        return weight, weight, weight, weight, 0, 0.0
    clear = norm.clear if norm.clear is not None else norm.weight
    count = norm.clear.numel() if norm.clear is not None else 0
    return norm.residual, norm.out, norm.weight, clear, count, norm.eps


def dense(y: torch.Tensor | SplitK) -> torch.Tensor:
    """A product as a plain tensor, whichever way it was computed."""
    return y.total() if isinstance(y, SplitK) else y


def dequantized(w: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """A weight as stored, in float32: an 8-bit one times its per-output-channel `scale`."""
    return w.float() * (scale.float()[:, None] if scale is not None else 1.0)


def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, scale: torch.Tensor | None = None):
    """cuBLAS's product; an 8-bit weight (with `scale`) is dequantized first (every call: the
    fallback the quantized kernels must beat, and their reference)."""
    if scale is not None:
        w = dequantized(w, scale).to(x.dtype)
    return torch.nn.functional.linear(x, w, b)


def takes_rounded(entry: Config | str | None) -> bool:
    """A table entry whose product takes its input rounded per row (`QuantRows`): the FP8 GEMM, or
    a tile with a 6th number 2."""
    return entry == FP8_GEMM or (isinstance(entry, tuple) and x_mode(entry) == X_ROUNDED_PER_ROW)


GLU_KEYS = ("glu gate_up", "glu down")  # table keys of a decode step whose gate_up tile makes the activation
# itself (`small_matmul(glu=...)`), and of the down tile that then takes the activation as it is


def gated_key(kind: str) -> str:
    """The table's key for a kind's product reading its input gated (`Gated`): "down+act"."""
    return f"{kind}+act"
