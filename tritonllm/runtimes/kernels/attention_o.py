"""A decode step's attention and the o product after it in one kernel for batches of a few rows
(OpenAI Triton): rotary, KV cache write, attention (`rope_attention.attend_new_row`), then the
attention output's share of o for a block of o's output columns, added into float32 sums.

At one row the attention runs on rows x KV heads programs (8 for the Llama shapes) and the o
product is a small kernel whose time is mostly fixed cost (its programs' first DRAM round trip,
its tail, the wait for the attention before it). Here a program of (row, KV head, block of o's
output columns) attends for its KV head's G query heads, then multiplies their outputs by o's
weight columns of those heads for its block of outputs (CUDA cores: one row), and adds the result
into the row's sums with atomic adds: the o product needs no kernel of its own and its weight
streams in the same kernel. Each of a head's column blocks repeats its attention (the head's keys
come from L2 after the first), so the form pays at short contexts and few rows, which is where the
start-up tuner keeps it. The first column block's program writes the new key and value.

The attention output is rounded to the activations' type before the product (as the unfused
step stores it); the sums' order is the atomics' order, so results match the unfused kernels
within float32 rounding and may differ in the last bits between runs. The add + norm after it
reads the sums as `Accumulated` and zeroes them (`mlp` shares the buffer the same way)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import gating
from . import pdl as gdc
from .attention import Tile, value_strides
from .gemv import Accumulated, dequantized
from .rope_attention import attend_new_row, rope_attention

KEY = "attention+o"  # the decode table's key (with batch rows) of this kernel's tile
MAX_ROWS = 4  # each row's programs read o's weight again (from L2 past the first): few rows only
# (o's output columns a program, warps, stages): the candidates start-up timing chooses from; a 4th
# number 1 also asks L2 for the program's block of o's weight before its attention (where launched
# with PDL, as the decode step is: the interpreter has no prefetch), each tile timed both ways
OTile = tuple[int, ...]
TILES: tuple[OTile, ...] = ((64, 4, 2), (128, 4, 2), (128, 8, 2), (256, 8, 2), (32, 4, 2))
TOLERANCE = 2e-2  # the attention output rounded to the activations' type, then float32 sums


@triton.jit
def _attention_o_kernel(
    qkv, cos, sin, k_cache, v_cache, table, pos, write_slot, like, kv_scale, w_o, s_o, sums,
    limit, window, scale, softcap, n_split, s_split, s_qkv, s_cs, s_table, s_c_block, s_c_head, s_c_pos, s_v_pos,
    s_v_d, N, PAGE: tl.constexpr, G: tl.constexpr, R: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    CAPPED: tl.constexpr, FP8: tl.constexpr, HKV: tl.constexpr, KT: tl.constexpr, BLOCK_C: tl.constexpr,
    HAS_SCALE: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr = 0, ELEM: tl.constexpr = 1,
):  # fmt: skip
    gdc.enter(PDL)
    row, kv, cb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n = cb * BLOCK_C + tl.arange(0, BLOCK_C)  # this program's output columns of o
    n_ok = n < N
    width = G * HKV * D  # o's input: every query head's D values
    if PREFETCH:  # o's weight for this block streams into L2 while the attention below waits on its keys
        gdc.prefetch_rows(w_o, n, n_ok, width, kv * G * D, width, PREFETCH, ELEM)
    m_i, l_i, acc = attend_new_row(
        qkv, cos, sin, k_cache, v_cache, table, pos, write_slot, like, kv_scale, row, kv, 0, cb == 0,
        limit, window, scale, softcap, n_split, s_split, s_qkv, s_cs, s_table, s_c_block, s_c_head, s_c_pos,
        s_v_pos, s_v_d, PAGE, G, R, D, BLOCK_N, CAPPED, FP8, HKV, KT, 1,
    )  # fmt: skip
    if FP8:  # values stored divided by the head's scale
        acc = acc * tl.load(kv_scale + HKV + kv)
    a = (acc / tl.where(l_i > 0, l_i, 1.0)[:, None]).to(like.dtype.element_ty).to(tl.float32)  # [R, D]
    i, d = tl.arange(0, R), tl.arange(0, D)
    part = tl.zeros([BLOCK_C], dtype=tl.float32)
    for g in tl.static_range(G):  # query head kv * G + g: its D input columns of o
        a_g = tl.sum(tl.where((i == g)[:, None], a, 0.0), 0)
        w = tl.load(w_o + n[:, None] * width + (kv * G + g) * D + d[None, :], mask=n_ok[:, None], other=0.0)
        part += tl.sum(w.to(tl.float32) * a_g[None, :], 1)
    if HAS_SCALE:  # 8-bit weights: their per-output-channel scales
        part = part * tl.load(s_o + n, mask=n_ok, other=0.0).to(tl.float32)
    tl.atomic_add(sums + row * N + n, part, mask=n_ok, sem="relaxed")


@dataclass(frozen=True)
class RowAttention:
    """What a decode step's attention reads besides the qkv product, as `rope_attention` takes it:
    row b at positions[b] of slot b, its new key and value written to slot writes[b]; the layer's
    caches [blocks, Hkv, PAGE, D] and block table; `config` a `Tile` or its leading fields."""

    cos: torch.Tensor
    sin: torch.Tensor
    positions: torch.Tensor
    writes: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    table: torch.Tensor
    n_heads: int
    limit: int
    config: tuple
    window: int | None = None
    scale: float | None = None
    softcap: float | None = None
    kv_scale: torch.Tensor | None = None


def attention_o(qkv, at: RowAttention, o: tuple, tile: OTile, sums=None, pdl: bool = False) -> Accumulated:
    """`rope_attention`'s attention of the qkv product [B, (H+2Hkv)*D] (or its split partial sums)
    as `at` describes it (one split only: the config's keys per block and key layout are used),
    multiplied by o's weight [N, H*D] (`o` = (weight, per-output-channel scale or None)), no bias:
    added into `sums` [rows, N] float32 (zeros, made here where None) and returned as
    `Accumulated`. `tile`: (o's output columns a program, warps, stages[, 1: o's weight asked of L2
    before the attention, where `pdl`])."""
    parts, n_split, s_split, dtype = gating.parts(qkv)
    (b, _), (_, hkv, page, d) = parts.shape[1:], at.k_cache.shape
    (w_o, s_o), att = o, Tile(*at.config)
    n = w_o.shape[0]
    if att.splits != 1 or b > MAX_ROWS or w_o.shape[1] != at.n_heads * d or not w_o.is_contiguous():
        raise ValueError(
            f"attention + o: attention config {tuple(att)} (one split only), {b} rows (at most {MAX_ROWS}), "
            f"o {tuple(w_o.shape)} contiguous={w_o.is_contiguous()}: needs one split, few rows and "
            f"o [N, {at.n_heads * d}]"
        )
    sums = torch.zeros(b, n, dtype=torch.float32, device=parts.device) if sums is None else sums
    cos, sin, k_cache = at.cos.reshape(-1, d), at.sin.reshape(-1, d), at.k_cache
    block_c, warps, stages = tile[:3]
    lines = gdc.prefetch_lines(at.n_heads // hkv * d, at.n_heads // hkv * d, w_o.element_size(), 1)
    prefetch = lines if pdl and len(tile) > 3 and tile[3] else 0
    _attention_o_kernel[(b, hkv, triton.cdiv(n, block_c))](
        parts, cos, sin, k_cache, at.v_cache, at.table, at.positions, at.writes, gating.like(parts, dtype),
        at.kv_scale if at.kv_scale is not None else cos, w_o, s_o if s_o is not None else w_o, sums,
        at.limit, at.window or 2**30, at.scale or d**-0.5, at.softcap or 1.0, n_split, s_split, parts.stride(1),
        cos.stride(0), at.table.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        *value_strides(k_cache, at.v_cache, att.block_n), n,
        PAGE=page, G=at.n_heads // hkv, R=max(16, triton.next_power_of_2(at.n_heads // hkv)), D=d,
        BLOCK_N=att.block_n, CAPPED=at.softcap is not None, FP8=at.kv_scale is not None, HKV=hkv,
        KT=att.transposed, BLOCK_C=block_c, HAS_SCALE=s_o is not None, num_warps=warps, num_stages=stages,
        PREFETCH=prefetch, ELEM=w_o.element_size(), **gdc.launch(pdl),
    )  # fmt: skip
    return Accumulated(sums.view(1, b, n), dtype)


def tune(
    caches: list, num_heads: int, o_layers: list, attention: dict, batches: Sequence[int], rope_us: dict,
    o_us: dict, context: int, dtype, consume, pdl: bool,
):  # fmt: skip
    """Where this kernel beats rotary-in-attention + o's tuned product: for each of `batches` (those
    whose attention does the rotary) up to MAX_ROWS whose `attention` config has one split, TILES
    are checked against `rope_attention` then o in float32 on random keys and timed over every
    layer (`caches`: (keys, values, fp8 scales or None); `o_layers`: (weight, scale)), each
    followed by `consume` (the add + norm, which zeroes the sums), new keys at position `context`
    - 1; kept where under `timing.ATOMICS_MARGIN` of `rope_us[b]` + `o_us[b]` (the rotary stage's
    and o's tuned microseconds, both over every layer, o with the same add + norm). Writes those
    positions of the caches (tuning runs before any sequence holds them). Returns
    ({(KEY, b): tile}, timings)."""
    from .attention_tuning import random_pool, spread_table
    from .timing import agrees, check_all, graph_ms, keep_unordered

    blocks, hkv, page, d = caches[0][0].shape
    device, found, out = caches[0][0].device, {}, []
    for b in (b for b in sorted(batches) if b <= MAX_ROWS and b in rope_us and b in o_us):
        config = attention[b]
        if Tile(*config).splits != 1:
            continue
        qkv = torch.randn(b, (num_heads + 2 * hkv) * d, device=device, dtype=dtype)
        ang = torch.randn(b, d // 2, device=device)
        cos, sin = (torch.cat([f(ang)] * 2, -1).to(dtype) for f in (torch.cos, torch.sin))
        pos, rows = torch.full((b,), context - 1, device=device), torch.arange(b, device=device)
        kr, vr, check = random_pool(b, context, caches[0][0])
        s0 = caches[0][2]

        def run(k, v, blocks_of, s, o, tile, sums=None):
            at = RowAttention(cos, sin, pos, rows, k, v, blocks_of, num_heads, context, config, kv_scale=s)
            return attention_o(qkv, at, o, tile, sums, pdl)

        a = rope_attention(qkv, cos, sin, pos, rows, kr, vr, check, num_heads, context, config, kv_scale=s0)
        ref = a.float() @ dequantized(*o_layers[0]).T
        label = lambda t: f"attention + o {t} at {b} rows"
        tiles = [*TILES, *((*t, 1) for t in TILES)] if pdl else list(TILES)  # (prefetch: PDL launches only)
        ok = check_all(
            [lambda t=t: agrees(label(t), lambda: run(kr, vr, check, s0, o_layers[0], t).total(), ref, TOLERANCE)
             for t in tiles], device, ref,
        )  # fmt: skip
        tab = spread_table(b, context, page, blocks, device)
        sums = torch.zeros(b, o_layers[0][0].shape[0], device=device)
        times = {"as tuned": (rope_us[b] + o_us[b]) / 1e3}  # ms
        for tile in (t for t, agreed in zip(tiles, ok) if agreed):
            step = lambda t=tile: [consume(run(k, v, tab, s, o, t, sums)) for (k, v, s), o in zip(caches, o_layers)]
            times[tile] = graph_ms(step)
        keep_unordered(found, out, KEY, b, times, "attention + o")
    return found, out
