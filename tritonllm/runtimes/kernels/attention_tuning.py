"""Start-up tuning of the decode attention (`attention`): each tile configuration timed over every
layer's cache (CUDA graph replays) on random keys and values in pools laid out as the runtime's,
rows' blocks spread over the pool, and checked against the default's output first; the split-key
table for long contexts; the prompt pieces' tile."""

from __future__ import annotations

import logging

import torch

from .attention import ATTENTION_CONFIGS, PIECE_CONFIGS, SPLIT_TILES, SPLITS, PieceTiles, Tile, decode_attention
from .pages import as_values

log = logging.getLogger(__name__)


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
    zeros, which any tile would agree on), and a table of `rows` rows of `context` positions into
    it: what tuning checks candidates on."""
    blocks, hkv, page, d = like.shape
    few = min(blocks, rows * -(-context // page))
    kr = torch.randn((few, hkv, page, d), device=like.device).to(like.dtype)
    vr = as_values(torch.randn((few, hkv, page, d), device=like.device).to(like.dtype))
    return kr, vr, spread_table(rows, context, page, few, like.device)


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
