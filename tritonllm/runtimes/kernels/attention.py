"""Decode attention (OpenAI Triton) for the torch-cuda runtime: one query token per row against its
slot's cached keys/values, found through the slot's block table (a paged cache: position p is at
offset p % PAGE of block table[slot, p // PAGE]), flash-style (online softmax over tiles of the
context, each tile's keys gathered by their blocks), the G query heads of a KV head as the rows of
one tile so K/V are read once (for a prompt piece, `PieceTiles`: the heads of several of its
tokens); values read a block at a time through their own strides (a cache that keeps each block's
values as [D, PAGE], `pages.value_pool`, as the runtime's does, feeds the P.V product
keys-contiguous; 8-bit values laid out [PAGE, D] reach the Tensor Cores a byte at a time); each row
reads only its own valid length (read on the device, so one CUDA graph serves
every length), from the start of its sliding window where the layer has one. `tune_attention`
picks the tile configuration per batch size at start-up. Checked against SDPA with
TRITON_INTERPRET=1 on the CPU (tests/parity)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import pdl as gdc
from .pages import value_pool

log = logging.getLogger(__name__)


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
        at = base[:, None] + d[None, :]
        if KT:  # keys read as [D, BLOCK_N] already: no transpose of the tile before the product
            kt = tl.load(k_cache + base[None, :] + d[:, None], mask=live[None, :], other=0.0)
        else:
            kt = tl.trans(tl.load(k_cache + at, mask=live[:, None], other=0.0))
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


def spread_table(rows: int, context: int, page: int, num_blocks: int, device) -> torch.Tensor:
    """A block table [rows, context / page] whose rows hold distinct blocks spread over the pool (as
    a busy cache's are), wrapping around where the pool is smaller: what tuning and checks read."""
    n = -(-context // page)
    step = max(1, num_blocks // max(1, rows * n))
    flat = (torch.arange(rows * n, device=device) * step) % num_blocks
    return flat.view(rows, n).to(torch.int32)


def random_pool(rows: int, context: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random keys and values in a pool of their own, shaped and typed as the cache `like` [blocks,
    Hkv, PAGE, D], values laid out by `value_pool` as the runtime's are (a real cache may be all
    zeros, which any tile would agree on), and a table of
    `rows` rows of `context` positions into it: what tuning checks candidates on."""
    blocks, hkv, page, d = like.shape
    few = min(blocks, rows * -(-context // page))
    kr = torch.randn((few, hkv, page, d), device=like.device).to(like.dtype)
    vr = value_pool((few, hkv, page, d), like.dtype, like.device, _random)
    return kr, vr, spread_table(rows, context, page, few, like.device)


def _random(shape, dtype, device) -> torch.Tensor:
    return torch.randn(shape, device=device).to(dtype)


def _agreeing_times(caches, num_heads: int, b: int, context: int, dtype, ref_config, candidates) -> dict:
    """{config: ms} for each of `candidates` whose output agrees with `ref_config`'s on random keys
    (one that does not build here is left out, not the whole table): `b` rows of `context` keys,
    timed over every layer's (keys, values, fp8 scales or None) in `caches` (CUDA graph replays),
    rows' blocks spread over the pool."""
    from .timing import check_all, graph_ms

    k0 = caches[0][0]
    blocks, hkv, page, d = k0.shape
    q = torch.randn(b, num_heads, d, device=k0.device, dtype=dtype)
    pos = torch.full((b,), context - 1, device=q.device)
    tab = spread_table(b, context, page, blocks, q.device)
    kr, vr, check = random_pool(b, context, k0)
    run = lambda cfg: decode_attention(q, kr, vr, check, pos, context, cfg, kv_scale=caches[0][2])
    ref = run(ref_config).float()
    checks = [lambda cfg=cfg: _agrees(lambda: run(cfg), ref, cfg) for cfg in candidates]
    agree = [cfg for cfg, ok in zip(candidates, check_all(checks, q.device, ref)) if ok]
    return {
        cfg: graph_ms(
            lambda cfg=cfg: [decode_attention(q, k, v, tab, pos, context, cfg, kv_scale=s) for k, v, s in caches]
        )
        for cfg in agree
    }


def _timings(chosen, times: dict, **where) -> dict:
    """A tuner's log entry: where it timed, what it chose, every candidate's microseconds."""
    return {**where, "chosen": str(chosen), "us": {str(c): round(1e3 * t, 1) for c, t in times.items()}}


def layer_caches(k_caches, v_caches, kv_scales) -> list:
    """(keys, values, fp8 scales or None) of every layer."""
    return list(zip(k_caches, v_caches, kv_scales if kv_scales is not None else [None] * len(k_caches)))


def tune_attention(
    k_caches, v_caches, num_heads: int, batches, context: int, dtype: torch.dtype, kv_scales=None
) -> tuple[dict, list]:
    """The fastest ATTENTION_CONFIGS entry per batch size, timed over every layer's cache
    [blocks, Hkv, PAGE, D] at `context` keys per row, rows' blocks spread over the pool (CUDA graph
    replays); queries in `dtype`, each layer's `kv_scales` [2, Hkv] where the caches are fp8 (then
    each entry also with its keys read transposed). Returns ({batch: config}, timings for the log)."""
    caches = layer_caches(k_caches, v_caches, kv_scales)
    candidates = list(ATTENTION_CONFIGS)
    if kv_scales is not None:
        candidates += [(*cfg, True) for cfg in ATTENTION_CONFIGS]
    table, report = {}, []
    for b in batches:  # the default is checked against SDPA in self_check
        times = _agreeing_times(caches, num_heads, b, context, dtype, ATTENTION_CONFIGS[0], candidates)
        table[b] = min(times, key=times.get)
        report.append(_timings(table[b], times, batch=b))
    return table, report


def split_candidates(batches, kv_heads: int, programs: int, fp8: bool) -> dict:
    """{batch: Tile candidates with split keys} for the batches whose rows x `kv_heads` stay within
    4 x `programs` (the SM count): more rows fill the GPU without splitting."""
    forms = (False, True) if fp8 else (False,)
    tiles = [Tile(*t, kt, n) for t in SPLIT_TILES for kt in forms for n in SPLITS]
    return {b: tiles for b in batches if b * kv_heads <= 4 * programs}


def tune_splits(k_caches, v_caches, num_heads: int, table: dict, context: int, dtype, kv_scales=None):
    """{batch: split Tile} where one beats the batch's unsplit config (`table`, from
    `tune_attention`) at `context` keys a row, timed like it; batches with no such win are left
    out. Returns (that table, timings for the log)."""
    caches = layer_caches(k_caches, v_caches, kv_scales)
    hkv, device = k_caches[0].shape[1], k_caches[0].device
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    splits, report = {}, []
    for b, tiles in split_candidates(sorted(table), hkv, sms, kv_scales is not None).items():
        times = _agreeing_times(caches, num_heads, b, context, dtype, table[b], [table[b], *tiles])
        best = min(times, key=times.get)
        if best != table[b]:
            splits[b] = best
        report.append(_timings(best, times, batch=b, context=context))
    return splits, report


def _agrees(run, ref: torch.Tensor, config) -> bool:
    """Whether a candidate tile gives the default's output; one that does not build on this GPU
    (its tiles overflow shared memory or registers at a large head size) is no candidate."""
    try:
        return torch.allclose(run().float(), ref, atol=2e-2, rtol=2e-2)
    except Exception as exc:  # OpenAI Triton's out-of-resources and compile errors have no common base
        log.info("attention tile %s left out: %s", config, str(exc)[:200])
        return False


def tune_pieces(k_caches, v_caches, num_heads: int, shapes, dtype: torch.dtype, kv_scales=None) -> tuple[tuple, list]:
    """The PIECE_CONFIGS entry with the least time over `shapes` [(pieces, tokens each, cached
    positions before them)], each step timed over every layer's cache (CUDA graph replays), the
    pieces' blocks spread over the pool; a config whose output differs from the default's on random
    keys is left out. Returns (config, timings for the log)."""
    from .timing import check_all, graph_ms

    blocks, hkv, page, d = k_caches[0].shape
    device, group = k_caches[0].device, num_heads // hkv
    scales = kv_scales if kv_scales is not None else [None] * len(k_caches)
    put = lambda v: torch.tensor(v, dtype=torch.int32, device=device)
    totals, report = dict.fromkeys(PIECE_CONFIGS, 0.0), []
    for pieces, n, past in shapes:
        q = torch.randn(pieces * n, num_heads, d, device=device, dtype=dtype)
        slots = torch.arange(pieces, device=device).repeat_interleave(n)
        pos = (past + torch.arange(n, device=device)).repeat(pieces)
        tab = spread_table(pieces, past + n, page, blocks, device)
        kr, vr, check = random_pool(pieces, past + n, k_caches[0])
        tiles = {c: PieceTiles.of([n] * pieces, PieceTiles.rows_for(group, pieces * n, hkv, c[0]), put) for c in totals}

        def run(cfg, k, v, table, s):
            return decode_attention(
                q, k, v, table, pos, past + n, cfg[1:], row_slots=slots, kv_scale=s, tiles=tiles[cfg]
            )

        ref = run(PIECE_CONFIGS[0], kr, vr, check, scales[0]).float()
        checks = [lambda c=c: _agrees(lambda: run(c, kr, vr, check, scales[0]), ref, c) for c in totals]
        agree = [c for c, ok in zip(totals, check_all(checks, device, ref)) if ok]
        times = {
            c: graph_ms(lambda c=c: [run(c, *kvs) for kvs in zip(k_caches, v_caches, [tab] * len(scales), scales)])
            for c in agree
        }
        for c in totals:
            totals[c] = totals[c] + times[c] if c in times else float("inf")
        report.append(
            {"pieces": pieces, "tokens": n, "past": past, "us": {str(c): round(1e3 * t, 1) for c, t in times.items()}}
        )
    return min(totals, key=totals.get), report
