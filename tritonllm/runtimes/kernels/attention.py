"""Decode attention (OpenAI Triton) for the torch-cuda runtime: one query token per row against its
slot's cached keys/values, found through the slot's block table (a paged cache: position p is at
offset p % PAGE of block table[slot, p // PAGE]), flash-style (online softmax over tiles of the
context, each tile's keys gathered by their blocks), the G query heads of a KV head as the rows of
one tile so K/V are read once (for a prompt piece, `PieceTiles`: the heads of several of its
tokens); values read a block at a time through their own strides (a cache that keeps each block's
values as [D, PAGE], `pages.value_pool`, as the runtime's does, feeds the P.V product
keys-contiguous; 8-bit values laid out [PAGE, D] reach the Tensor Cores a byte at a time); each row
reads only its own valid length (read on the device, so one CUDA graph serves every length), from
the start of its sliding window where the layer has one. `attention_tuning` picks the tile
configuration per batch size at start-up. Checked against SDPA with
TRITON_INTERPRET=1 on the CPU (tests/parity)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import pdl as gdc


@triton.jit
def _value_tile(
    v_cache, table, slot, kv, lo, n, start, s_table, s_c_block, s_c_head, s_v_pos, s_v_d,
    PAGE: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Values of keys start..start+BLOCK_N-1 [BLOCK_N, D], read a block (PAGE keys) at a time: with
    s_v_pos 1 each of a block's D rows is PAGE keys in a row, the layout the P.V product's operand
    takes without moving single bytes. Keys outside lo..n-1 in a block that holds some inside are
    read as they are (their weight is 0; every cache value is finite: fp8 ones are saturated), a
    block of none of them as 0."""
    pg = start // PAGE + tl.arange(0, BLOCK_N // PAGE)
    live = (pg * PAGE < n) & (pg * PAGE + PAGE > lo)
    block = tl.load(table + slot * s_table + pg, mask=live, other=0).to(tl.int64)
    k, d = tl.arange(0, PAGE), tl.arange(0, D)
    at = (block * s_c_block + kv * s_c_head)[:, None, None] + d[None, :, None] * s_v_d + k[None, None, :] * s_v_pos
    v = tl.load(v_cache + at, mask=live[:, None, None], other=0.0)  # [blocks, D, PAGE]
    return tl.reshape(tl.permute(v, (0, 2, 1)), (BLOCK_N, D))


@triton.jit
def attend_tiles(
    qv, k_cache, v_cache, table, slot, kv, lo, n, lo_r, n_r, begin, end, scale, softcap, m_i, l_i, acc,
    s_table, s_c_block, s_c_head, s_c_pos, s_v_pos, s_v_d,
    PAGE: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, CAPPED: tl.constexpr, FP8: tl.constexpr,
    KT: tl.constexpr,
):  # fmt: skip
    """The online softmax of queries qv [R, D] over the cached keys begin..end-1 of `slot`'s KV head
    `kv`, BLOCK_N at a time (`begin` a multiple of it): keys lo..n-1 read, row r's scores kept at
    lo_r[r]..n_r[r]-1; its running (max, sum, weighted values) taken and returned. Values are at
    position * s_v_pos + d * s_v_d of their block and head."""
    d = tl.arange(0, D)
    for start in range(begin, end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        live = (cols < n) & (cols >= lo)
        block = tl.load(table + slot * s_table + cols // PAGE, mask=live, other=0).to(tl.int64)
        base = block * s_c_block + kv * s_c_head + (cols % PAGE) * s_c_pos
        if KT:  # keys read as [D, BLOCK_N] already: no transpose of the tile before the product
            kt = tl.load(k_cache + base[None, :] + d[:, None], mask=live[None, :], other=0.0)
        else:
            kt = tl.trans(tl.load(k_cache + base[:, None] + d[None, :], mask=live[:, None], other=0.0))
        if FP8:
            kt = kt.to(tl.float16)
        s = tl.dot(qv, kt).to(tl.float32) * scale
        if CAPPED:  # Gemma 2: cap * tanh(s / cap), tanh from exp (2 / (1 + e^-2z) - 1)
            s = softcap * (2.0 / (1.0 + tl.exp(-2.0 * s / softcap)) - 1.0)
        s = tl.where((cols[None, :] < n_r[:, None]) & (cols[None, :] >= lo_r[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row none of whose keys are in this tile yet
        alpha = tl.exp(m_i - m_use)
        p = tl.exp(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vb = _value_tile(v_cache, table, slot, kv, lo, n, start, s_table, s_c_block, s_c_head, s_v_pos, s_v_d,
                         PAGE, D, BLOCK_N)  # fmt: skip
        if FP8:
            vb = vb.to(tl.float16)
        acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb).to(tl.float32)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def finish_rows(
    acc, m_i, l_i, out, part, kv_scale, at_q, row, kv, head, real,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, FP8: tl.constexpr, SPLITS: tl.constexpr,
):  # fmt: skip
    """A program's query rows done: normalised into out at `at_q`, or with SPLITS > 1 unnormalised
    (max, sum, weighted values) per query head of `row` into `part`, for `_combine_splits_kernel`."""
    d = tl.arange(0, D)
    if FP8:  # values stored divided by the head's scale
        acc = acc * tl.load(kv_scale + HKV + kv)
    if SPLITS > 1:
        at_p = ((tl.program_id(2) * tl.num_programs(0) + row) * (HKV * G) + kv * G + head) * (D + 2)
        tl.store(part + at_p[:, None] + d[None, :], acc, mask=real[:, None])
        tl.store(part + at_p + D, m_i, mask=real)
        tl.store(part + at_p + D + 1, l_i, mask=real)
    else:
        acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # 0 only in padding rows (never stored)
        tl.store(out + at_q, acc.to(out.dtype.element_ty), mask=real[:, None])


@triton.jit
def _decode_attention_kernel(
    q,
    k_cache,
    v_cache,
    table,
    pos,
    row_slot,
    tile_row,
    tile_len,
    out,
    part,
    kv_scale,
    limit,
    window,
    scale,
    softcap,
    s_q_b,
    s_q_h,
    s_table,
    s_c_block,
    s_c_head,
    s_c_pos,
    s_v_pos,
    s_v_d,
    PAGE: tl.constexpr,
    HAS_SLOTS: tl.constexpr,
    TILED: tl.constexpr,
    G: tl.constexpr,
    R: tl.constexpr,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAPPED: tl.constexpr,
    FP8: tl.constexpr,
    HKV: tl.constexpr,
    KT: tl.constexpr,
    SPLITS: tl.constexpr,
    PDL: tl.constexpr,
):
    gdc.enter(PDL)
    t, kv, sp = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    first = tl.load(tile_row + t) if TILED else t  # the program's rows: first.. first+count-1, one slot's
    count = tl.load(tile_len + t) if TILED else 1
    i, d = tl.arange(0, R), tl.arange(0, D)  # R rows: token i // G of the tile, query head kv * G + i % G
    tok, row = i // G, first + i // G
    real = tok < count
    at_q = (row * s_q_b + (kv * G + i % G) * s_q_h)[:, None] + d[None, :]
    qv = tl.load(q + at_q, mask=real[:, None], other=0.0)
    if FP8:  # fp8 keys/values widen to fp16 in far fewer instructions than to bf16; the products
        qv = qv.to(tl.float16)  # run in fp16 (a bf16 query is exact in it up to |q| 65,504)
    # keys 0..pos, never past the graph's; positions as int32 (the step's int64 ones make every mask
    # compare of the key loop two instructions)
    n_r = tl.minimum(tl.load(pos + row, mask=real, other=0).to(tl.int32) + 1, limit)
    lo_r = tl.maximum(n_r - window, 0)  # a sliding window sees the last `window` keys only
    n = tl.max(n_r, 0)
    lo = tl.min(tl.where(real, lo_r, n), 0)  # padding rows must not pull the first tile back
    slot = tl.load(row_slot + first) if HAS_SLOTS else first
    m_i = tl.full([R], float("-inf"), tl.float32)
    l_i = tl.zeros([R], tl.float32)
    acc = tl.zeros([R, D], tl.float32)
    if FP8:  # keys/values stored divided by the head's scale
        scale = scale * tl.load(kv_scale + kv)
    begin, end = (lo // BLOCK_N) * BLOCK_N, n
    if SPLITS > 1:  # this program takes its share of the keys, whole tiles of them; `part` gets its sums
        share = tl.cdiv(tl.cdiv(n - begin, SPLITS), BLOCK_N) * BLOCK_N
        begin = begin + sp * share
        end = tl.minimum(n, begin + share)
    m_i, l_i, acc = attend_tiles(
        qv, k_cache, v_cache, table, slot, kv, lo, n, lo_r, n_r, begin, end, scale, softcap, m_i, l_i, acc,
        s_table, s_c_block, s_c_head, s_c_pos, s_v_pos, s_v_d, PAGE, D, BLOCK_N, CAPPED, FP8, KT,
    )  # fmt: skip
    finish_rows(acc, m_i, l_i, out, part, kv_scale, at_q, row, kv, i % G, real, HKV, G, D, FP8, SPLITS)


@triton.jit
def _combine_splits_kernel(part, out, flats, SPLITS: tl.constexpr, D: tl.constexpr, PDL: tl.constexpr):
    """One query head of one row (program id = row * heads + head, of `flats`; out [rows, heads, D]
    contiguous): the splits' sums rescaled to their common maximum, a split that saw no key weighing
    nothing."""
    gdc.enter(PDL)
    flat, sp, d = tl.program_id(0), tl.arange(0, SPLITS), tl.arange(0, D)
    at = (sp * flats + flat) * (D + 2)
    m = tl.load(part + at + D)
    w = tl.exp(m - tl.max(m, 0))
    w = tl.where(m == float("-inf"), 0.0, w)
    acc = tl.sum(tl.load(part + at[:, None] + d[None, :]) * w[:, None], 0)
    total = tl.sum(tl.load(part + at + D + 1) * w, 0)
    tl.store(out + flat * D + d, (acc / tl.where(total > 0, total, 1.0)).to(out.dtype.element_ty))


@dataclass(frozen=True)
class PieceTiles:
    """Prompt pieces' token rows in tiles for `decode_attention`: tile t is rows first[t] ..
    first[t] + count[t] - 1, all of one piece (one slot), at most `rows` of them."""

    first: torch.Tensor  # [tiles] int32 or int64
    count: torch.Tensor  # [tiles] int32 or int64
    rows: int

    def __len__(self) -> int:
        return self.first.shape[0]

    @staticmethod
    def rows_for(group: int, tokens: int, kv_heads: int, query_rows: int = 64, programs: int = 1024) -> int:
        """Tokens per tile: about `query_rows` query rows a program (tokens x the `group` query heads
        of a KV head; one tile of keys serves them all), fewer while `tokens` would make under
        `programs` programs (a lone 512-token chunk in tiles of 16 would be 32 programs per KV head,
        too few to keep the GPU's SMs busy)."""
        rows = max(1, query_rows // group)
        while rows > 1 and -(-tokens // rows) * kv_heads < programs:
            rows //= 2
        return rows

    @staticmethod
    def lists(lengths: list[int], rows: int) -> tuple[list[int], list[int]]:
        """(first row, rows) of each tile of pieces laid out one after another with these token counts."""
        first, count, at = [], [], 0
        for n in lengths:
            first += range(at, at + n, rows)
            count += [min(rows, n - j) for j in range(0, n, rows)]
            at += n
        return first, count

    @staticmethod
    def of(lengths: list[int], rows: int, put) -> PieceTiles:
        """`lists` as int32 device tensors: `put(list)` makes one of a host list."""
        return PieceTiles(*map(put, PieceTiles.lists(lengths, rows)), rows)


class Tile(NamedTuple):
    """A decode attention configuration: keys per tile, warps, pipeline stages; keys read as
    [D, keys] (no transpose of the tile); the keys of each row split over `splits` programs whose
    sums a second kernel combines (flash-decoding: more programs where rows x KV heads are few and
    contexts long). Plain tuples of its leading fields stand for it."""

    block_n: int
    warps: int
    stages: int
    transposed: bool = False
    splits: int = 1


# (keys per block, warps, stages); 1-2 warps: a batch of many rows runs more programs per SM at once.
# A config may end in True: keys read as [D, BLOCK_N] (no transpose of the tile), which `tune_attention`
# also tries for fp8 caches, where it helped (results/2026-12-04-h200-attention-sweep).
ATTENTION_CONFIGS = ((64, 4, 3), (128, 4, 3), (128, 8, 3), (256, 8, 2), (64, 2, 3), (32, 2, 4), (32, 1, 2), (32, 1, 3))

# Splitting a row's keys pays where rows x KV heads are about one program per SM or fewer and rows
# hold 1,000+ keys (results/2026-12-04-h200-attention-splits): the tiles and splits tried there.
SPLIT_TILES = ((32, 1, 2), (64, 2, 3), (64, 4, 3))
SPLITS = (2, 4, 8)
LONG_CONTEXT = 1024  # graphs of at least this many keys use the split table where it has the batch


# prompt pieces: (query rows a program, keys per block, warps, stages); the first is the default.
# More rows a program read each tile of keys for more queries; their accumulator needs more warps.
PIECE_CONFIGS = (
    (64, 64, 4, 3),
    (64, 128, 4, 3),
    (64, 64, 8, 3),
    (64, 32, 4, 4),
    (128, 64, 8, 3),
    (128, 128, 8, 2),
    (128, 64, 4, 3),
    (32, 64, 4, 3),
)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    table: torch.Tensor,
    positions: torch.Tensor,
    limit: int,
    config: tuple = ATTENTION_CONFIGS[0],
    window: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    row_slots: torch.Tensor | None = None,
    kv_scale: torch.Tensor | None = None,
    tiles: PieceTiles | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """q [B,H,D] (contiguous) of slots 0..B-1 (or `row_slots` [B]: several rows may be one slot's,
    the tokens of a prompt piece, each attending up to its own position) at positions [B];
    k/v_cache [blocks,Hkv,PAGE,D] (one layer; the values read through their strides, fastest as
    `value_pool` lays them out), table [slots, blocks per sequence] (int32: the block of each
    slot's positions, PAGE at a time). Row b attends to keys 0..min(positions[b], limit - 1), the
    last `window` of them where one is set; scores scaled by `scale` (default D ** -0.5), then
    soft-capped at `softcap` where one is set. Returns [B,1,H*D]. `config`: a `Tile` or its leading
    fields (keys per tile: fewer tiles, fewer dependent loads, what a batch of few rows waits on;
    warps; stages; ...).
    `kv_scale` [2, Hkv] (float32): the caches are fp8, keys and values stored divided by their
    head's scale; the products then run in fp16. `tiles`: consecutive rows of one slot
    (a prompt piece's tokens) taken `tiles.rows` to a program, so each tile of keys is read once for
    all of them rather than once per row. `pdl`: launched with programmatic dependent launch."""
    b, h, d = q.shape
    hkv = k_cache.shape[1]
    out = torch.empty_like(q)
    tile = Tile(*config)
    if tile.splits > 1 and tiles is not None:
        raise ValueError(f"decode attention splits {tile.splits} with prompt-piece tiles: use splits 1 there")
    part = split_sums(tile, out)
    per = tiles.rows if tiles is not None else 1
    _decode_attention_kernel[(len(tiles) if tiles is not None else b, hkv, tile.splits)](
        q,
        k_cache,
        v_cache,
        table,
        positions,
        row_slots if row_slots is not None else positions,
        tiles.first if tiles is not None else positions,
        tiles.count if tiles is not None else positions,
        out,
        part,
        kv_scale if kv_scale is not None else q,
        limit,
        window or 2**30,
        scale or d**-0.5,
        softcap or 1.0,
        q.stride(0),
        q.stride(1),
        table.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        *value_strides(k_cache, v_cache, tile.block_n),
        PAGE=k_cache.shape[2],
        HAS_SLOTS=row_slots is not None,
        TILED=tiles is not None,
        G=h // hkv,
        R=max(16, triton.next_power_of_2(per * (h // hkv))),
        D=d,
        BLOCK_N=tile.block_n,
        CAPPED=softcap is not None,
        FP8=kv_scale is not None,
        HKV=hkv,
        KT=tile.transposed,
        SPLITS=tile.splits,
        num_warps=tile.warps,
        num_stages=tile.stages,
        **gdc.launch(pdl),
    )
    return combined(part, out, tile.splits, pdl)


def value_strides(k_cache: torch.Tensor, v_cache: torch.Tensor, block_n: int) -> tuple[int, int]:
    """(position, dimension) strides of a layer's values [blocks, Hkv, PAGE, D], which the kernels
    find blocks and heads of through the keys' strides; checked against the keys and against the
    keys a tile reads (whole blocks of them)."""
    page = v_cache.shape[-2]
    if v_cache.shape != k_cache.shape or v_cache.stride()[:2] != k_cache.stride()[:2]:
        raise ValueError(
            f"values {tuple(v_cache.shape)} strides {v_cache.stride()} against keys {tuple(k_cache.shape)} "
            f"strides {k_cache.stride()}: make both caches' blocks and heads alike (value_pool)"
        )
    if block_n % page:
        raise ValueError(f"attention tile of {block_n} keys over blocks of {page}: use a multiple of {page}")
    return v_cache.stride(-2), v_cache.stride(-1)


def split_sums(tile: Tile, out: torch.Tensor) -> torch.Tensor:
    """Where the programs of a row's key splits leave their sums for `out` [B, H, D] (`out` itself
    where unsplit)."""
    b, h, d = out.shape
    return torch.empty((tile.splits, b, h, d + 2), device=out.device, dtype=torch.float32) if tile.splits > 1 else out


def combined(part: torch.Tensor, out: torch.Tensor, splits: int, pdl: bool) -> torch.Tensor:
    """out [B, H, D] as [B, 1, H * D], the splits' sums in `part` combined into it first where split."""
    b, h, d = out.shape
    if splits > 1:
        _combine_splits_kernel[(b * h,)](part, out, b * h, SPLITS=splits, D=d, **gdc.launch(pdl))
    return out.view(b, 1, h * d)
