"""The decode step's rotary, KV cache write and attention in one kernel (OpenAI Triton): a program of
(row, KV head, key split) reads its G query heads, its key and its value straight from the qkv
product (split-K partial sums added as they load), rotates q and k, writes the new key and value
into the row's cache block (the first split's program), and attends over the cached keys before
the row's position plus the new key taken from registers. Nothing it writes is read back in the
kernel, so the programs of a row's other splits never wait for it; against `rope_kv_write` +
`decode_attention` one kernel and a round trip of q a layer go, which at a few rows is launch and
latency the step waits on. Models with q/k norms (Qwen3, Gemma 3) keep the two kernels.
Checked against them with TRITON_INTERPRET=1 on the CPU (tests/parity)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import gating
from . import pdl as gdc
from .attention import Tile, attend_tiles, combined, finish_rows, split_sums, value_strides
from .gemv import SplitK


@triton.jit
def _rotated(qkv, at, mask, c, sn, n_split, s_split, like, D: tl.constexpr):
    """Heads of the qkv product at `at` (each head's D values from there) rotated: x cos + x' sin,
    x' the head's other half, negated in its first half (rotate_half), float32."""
    d = tl.arange(0, D)
    partner = (d + D // 2) % D
    sign = tl.where(d < D // 2, -1.0, 1.0)
    x = gating.load_product(qkv, at + d, mask, n_split, s_split, like)
    xp = gating.load_product(qkv, at + partner, mask, n_split, s_split, like)
    return x * c + sign * xp * sn


@triton.jit
def _new_key_value(
    qkv, c, sn, k_cache, v_cache, table, write_slot, kv_scale, row, kv, p, write, n_split, s_split, s_qkv, like,
    s_table, s_c_block, s_c_head, s_c_pos, s_v_pos, s_v_d,
    PAGE: tl.constexpr, D: tl.constexpr, H: tl.constexpr, HKV: tl.constexpr, FP8: tl.constexpr,
):  # fmt: skip
    """The row's new key (rotated) and value of head `kv`, as the cache holds them (float32 of the
    cache's type, before the head's scale): written at position p of the row's write slot where
    `write` (one program of those that read the row's head)."""
    d = tl.arange(0, D)
    every = d < D
    k = _rotated(qkv, row * s_qkv + (H + kv) * D, every, c, sn, n_split, s_split, like, D)
    v = gating.load_product(qkv, row * s_qkv + (H + HKV + kv) * D + d, every, n_split, s_split, like)
    if FP8:  # divided by the head's scale, saturated at e4m3's largest
        k = tl.clamp(k / tl.load(kv_scale + kv), -448.0, 448.0)
        v = tl.clamp(v / tl.load(kv_scale + HKV + kv), -448.0, 448.0)
    k, v = k.to(k_cache.dtype.element_ty), v.to(v_cache.dtype.element_ty)
    block = tl.load(table + tl.load(write_slot + row) * s_table + p // PAGE).to(tl.int64)
    at = block * s_c_block + kv * s_c_head
    one = d < tl.where(write, D, 0)
    tl.store(k_cache + at + (p % PAGE) * s_c_pos + d, k, mask=one)
    tl.store(v_cache + at + (p % PAGE) * s_v_pos + d * s_v_d, v, mask=one)
    if FP8:  # what the attention reads of an fp8 cache: its values widened to fp16
        return k.to(tl.float16).to(tl.float32), v.to(tl.float16).to(tl.float32)
    return k.to(tl.float32), v.to(tl.float32)


@triton.jit
def _with_new_key(qv, k, v, scale, softcap, mine, m_i, l_i, acc, CAPPED: tl.constexpr):
    """The online softmax's (max, sum, weighted values) with the row's new key k [D] and value v
    [D] added where `mine` (the first split's program), its weight rounded to the products' type as
    the cached keys' tiles round theirs."""
    s = tl.sum(qv.to(tl.float32) * k[None, :], 1) * scale
    if CAPPED:
        s = softcap * (2.0 / (1.0 + tl.exp(-2.0 * s / softcap)) - 1.0)
    s = tl.where(mine, s, float("-inf"))
    m_new = tl.maximum(m_i, s)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key at all yet (a split without the new one)
    alpha, w = tl.exp(m_i - m_use), tl.exp(s - m_use)
    acc = acc * alpha[:, None] + w.to(qv.dtype).to(tl.float32)[:, None] * v[None, :]
    return m_new, l_i * alpha + w, acc


@triton.jit
def attend_new_row(
    qkv, cos, sin, k_cache, v_cache, table, pos, write_slot, like, kv_scale, row, kv, sp, write,
    limit, window, scale, softcap, n_split, s_split, s_qkv, s_cs, s_table, s_c_block, s_c_head, s_c_pos, s_v_pos,
    s_v_d, PAGE: tl.constexpr, G: tl.constexpr, R: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    CAPPED: tl.constexpr, FP8: tl.constexpr, HKV: tl.constexpr, KT: tl.constexpr, SPLITS: tl.constexpr,
):  # fmt: skip
    """The online softmax's (max, sum, weighted values) [R] [R] [R, D] of `row`'s G query heads of
    KV head `kv` (rows past G padding) over split `sp`'s share of its cached keys, the new key
    included in split 0's; the new key and value written to the cache where `write`."""
    i, d = tl.arange(0, R), tl.arange(0, D)
    real = i < G
    p = tl.load(pos + row).to(tl.int32)  # int32 compares in the key loop
    c, sn = tl.load(cos + row * s_cs + d).to(tl.float32), tl.load(sin + row * s_cs + d).to(tl.float32)
    at_q = (row * s_qkv + (kv * G + i) * D)[:, None]
    qv = _rotated(qkv, at_q, real[:, None], c[None, :], sn[None, :], n_split, s_split, like, D)
    qv = qv.to(like.dtype.element_ty)  # the query as the separate rotary kernel stores it
    if FP8:  # fp16 products against fp8 keys, as in decode_attention
        qv = qv.to(tl.float16)
    k, v = _new_key_value(
        qkv, c, sn, k_cache, v_cache, table, write_slot, kv_scale, row, kv, p, write, n_split, s_split, s_qkv, like,
        s_table, s_c_block, s_c_head, s_c_pos, s_v_pos, s_v_d, PAGE, D, G * HKV, HKV, FP8,
    )  # fmt: skip
    n_all = tl.minimum(p + 1, limit)  # keys 0..p: the cached ones before p, then the new one
    n = n_all - 1
    lo = tl.maximum(n_all - window, 0)  # a sliding window sees the last `window` keys only
    if FP8:  # keys/values stored divided by the head's scale
        scale = scale * tl.load(kv_scale + kv)
    begin, end = (lo // BLOCK_N) * BLOCK_N, n
    if SPLITS > 1:  # this program takes its share of the cached keys; the first split the new key too
        share = tl.cdiv(tl.cdiv(n - begin, SPLITS), BLOCK_N) * BLOCK_N
        begin = begin + sp * share
        end = tl.minimum(n, begin + share)
    m_i, l_i = tl.full([R], float("-inf"), tl.float32), tl.zeros([R], tl.float32)
    lo_r, n_r = tl.full([R], 0, tl.int32) + lo, tl.full([R], 0, tl.int32) + n
    m_i, l_i, acc = attend_tiles(
        qv, k_cache, v_cache, table, row, kv, lo, n, lo_r, n_r, begin, end, scale, softcap, m_i, l_i,
        tl.zeros([R, D], tl.float32), s_table, s_c_block, s_c_head, s_c_pos, s_v_pos, s_v_d, PAGE, D, BLOCK_N,
        CAPPED, FP8, KT,
    )  # fmt: skip
    return _with_new_key(qv, k, v, scale, softcap, sp == 0, m_i, l_i, acc, CAPPED)


@triton.jit
def _rope_attention_kernel(
    qkv, cos, sin, k_cache, v_cache, table, pos, write_slot, out, part, kv_scale,
    limit, window, scale, softcap, n_split, s_split, s_qkv, s_cs, s_table, s_c_block, s_c_head, s_c_pos, s_v_pos,
    s_v_d, PAGE: tl.constexpr, G: tl.constexpr, R: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    CAPPED: tl.constexpr, FP8: tl.constexpr, HKV: tl.constexpr, KT: tl.constexpr, SPLITS: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    gdc.enter(PDL)
    row, kv, sp = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    m_i, l_i, acc = attend_new_row(
        qkv, cos, sin, k_cache, v_cache, table, pos, write_slot, out, kv_scale, row, kv, sp, sp == 0,
        limit, window, scale, softcap, n_split, s_split, s_qkv, s_cs, s_table, s_c_block, s_c_head, s_c_pos,
        s_v_pos, s_v_d, PAGE, G, R, D, BLOCK_N, CAPPED, FP8, HKV, KT, SPLITS,
    )  # fmt: skip
    i, d = tl.arange(0, R), tl.arange(0, D)
    at_out = (row * G * HKV + kv * G + i)[:, None] * D + d[None, :]
    finish_rows(acc, m_i, l_i, out, part, kv_scale, at_out, row, kv, i, i < G, HKV, G, D, FP8, SPLITS)


def rope_attention(
    qkv: torch.Tensor | SplitK,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    writes: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    table: torch.Tensor,
    n_heads: int,
    limit: int,
    config: tuple,
    window: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    kv_scale: torch.Tensor | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """A decode step's attention from its qkv product [B, (H+2Hkv)*D] (or its split partial sums):
    row b is slot b at positions[b], its new key and value written at that position of slot
    writes[b]'s block (`rope_kv_write`'s cache write); attends as `decode_attention` does with the
    same `config` (a `Tile` or its leading fields), `window`, `scale`, `softcap` and `kv_scale`.
    cos/sin [B, ..., D]. Returns [B, 1, H*D]."""
    parts, n_split, s_split, dtype = gating.parts(qkv)
    (b, _), (_, hkv, page, d) = parts.shape[1:], k_cache.shape
    tile = Tile(*config)
    cos, sin = cos.reshape(-1, d), sin.reshape(-1, d)
    out = torch.empty((b, n_heads, d), dtype=dtype, device=parts.device)
    part = split_sums(tile, out)
    _rope_attention_kernel[(b, hkv, tile.splits)](
        parts, cos, sin, k_cache, v_cache, table, positions, writes, out, part,
        kv_scale if kv_scale is not None else cos,
        limit, window or 2**30, scale or d**-0.5, softcap or 1.0, n_split, s_split, parts.stride(1), cos.stride(0),
        table.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        *value_strides(k_cache, v_cache, tile.block_n),
        PAGE=page, G=n_heads // hkv, R=max(16, triton.next_power_of_2(n_heads // hkv)), D=d,
        BLOCK_N=tile.block_n, CAPPED=softcap is not None, FP8=kv_scale is not None, HKV=hkv, KT=tile.transposed,
        SPLITS=tile.splits, num_warps=tile.warps, num_stages=tile.stages, **gdc.launch(pdl),
    )  # fmt: skip
    return combined(part, out, tile.splits, pdl)


def tune(k_caches, v_caches, num_heads: int, table: dict, context: int, dtype, kv_scales=None) -> tuple[set, list]:
    """The batches where this kernel beats `rope_kv_write` + `decode_attention` with the batch's
    attention config (`table`, from `attention_tuning.tune_attention`), timed over every layer's cache
    (CUDA graph replays) with every row's new key at position `context` - 1 of blocks spread over
    the pool; a batch where it loses, or disagrees with the two kernels on random keys, is left
    out. Writes those positions of the caches (tuning runs before any sequence holds them).
    Returns (those batches, timings for the log)."""
    from .attention import decode_attention
    from .attention_tuning import layer_caches, random_pool, spread_table
    from .fused import rope_kv_write
    from .timing import agrees, graph_ms

    caches = layer_caches(k_caches, v_caches, kv_scales)
    blocks, hkv, page, d = k_caches[0].shape
    device, chosen, report = k_caches[0].device, set(), []
    for b, config in sorted(table.items()):
        qkv = torch.randn(b, (num_heads + 2 * hkv) * d, device=device, dtype=dtype)
        ang = torch.randn(b, d // 2, device=device)
        cos, sin = (torch.cat([f(ang)] * 2, -1).to(dtype) for f in (torch.cos, torch.sin))
        pos, rows = torch.full((b,), context - 1, device=device), torch.arange(b, device=device)

        def two(k, v, blocks_of, s):
            q = rope_kv_write(qkv, cos, sin, k, v, blocks_of, pos, num_heads, hkv, slots=rows, kv_scale=s)
            return decode_attention(q, k, v, blocks_of, pos, context, config, kv_scale=s)

        def one(k, v, blocks_of, s):
            return rope_attention(qkv, cos, sin, pos, rows, k, v, blocks_of, num_heads, context, config, kv_scale=s)

        kr, vr, check = random_pool(b, context, k_caches[0])
        ref = two(kr, vr, check, caches[0][2])
        if not agrees(f"rotary in attention at {b} rows", lambda: one(kr, vr, check, caches[0][2]), ref):
            continue
        tab = spread_table(b, context, page, blocks, device)
        forms = {"rotary kernel": two, "rotary in attention": one}
        times = {n: graph_ms(lambda f=f: [f(k, v, tab, s) for k, v, s in caches]) for n, f in forms.items()}
        if times["rotary in attention"] < times["rotary kernel"]:
            chosen.add(b)
        report.append({"batch": b, "us": {n: round(1e3 * t, 1) for n, t in times.items()}})
    return chosen, report
