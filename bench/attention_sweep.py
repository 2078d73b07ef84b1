"""The decode attention kernel against its KV-read floor, on the paged cache as the engine lays it
out (keys [blocks, Hkv, PAGE, D], values stored [blocks, Hkv, D, PAGE]: `pages.value_pool`; rows'
blocks spread over the pool): for each case (the 8B and 1B shapes' heads, bf16 or fp8 keys/values)
and batch, both kernel forms (keys read as [BLOCK_N, D] and transposed, or read as [D, BLOCK_N])
over the tile configurations, timed from CUDA graph replays over `--layers` pools of their own (each
larger than L2), each form's output checked against the default's. `--value-layouts pages rows`
also times values stored [PAGE, D] a block (the layout before `value_pool`), side by side. Prints
the best per (case, batch, form, value layout) and writes every timing.

  python -m bench.attention_sweep --batches 256 1024 --contexts 192 --value-layouts pages rows
  python -m bench.attention_sweep --batches 16 64 256 --contexts 192 1088 4096 --splits 1 2 4 8
"""

from __future__ import annotations

import argparse
import itertools
import logging

import torch

from bench.measure import write_results
from bench.provenance import DEFAULT_OUT
from bench.workloads import copy_bandwidth
from tritonllm.runtimes.kernels import attention as ak
from tritonllm.runtimes.kernels import attention_tuning
from tritonllm.runtimes.kernels.pages import as_values
from tritonllm.runtimes.kernels.timing import graph_ms

log = logging.getLogger("bench.attention_sweep")
CASES = {  # name: (query heads, KV heads, head size, fp8 keys/values)
    "8b-fp8": (32, 8, 128, True),
    "8b-bf16": (32, 8, 128, False),
    "1b-bf16": (32, 8, 64, False),
}
PAGE = 16
GRID = [(n, w, s) for n, w, s in itertools.product((32, 64, 128), (1, 2, 4, 8), (2, 3, 4)) if n * w <= 512]
SPLIT_TILES = ((32, 1, 2), (32, 1, 3), (64, 2, 3), (64, 4, 3))  # the tiles tried with splits > 1


VALUE_LAYOUTS = ("pages", "rows")  # values [D, PAGE] a block (the engine's), or [PAGE, D]


def pools(batch: int, context: int, hkv: int, d: int, fp8: bool, layers: int, values: str = "pages"):
    """`layers` (keys, values, scales) pools of `batch` rows x `context` positions, and their table;
    values laid out as `values` (VALUE_LAYOUTS) says."""
    blocks = batch * -(-context // PAGE)
    out = []
    for _ in range(layers):
        k, v = (torch.randn(blocks, hkv, PAGE, d, device="cuda") for _ in range(2))
        if values == "pages":
            v = as_values(v)
        if fp8:
            out.append((k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn), torch.rand(2, hkv, device="cuda") + 0.5))
        else:
            out.append((k.to(torch.bfloat16), v.to(torch.bfloat16), None))
    return out, attention_tuning.spread_table(batch, context, PAGE, blocks, "cuda")


def sweep(
    case: str, batch: int, context: int, layers: int, bandwidth: float, configs, only=None, values: str = "pages"
) -> list[dict]:
    h, hkv, d, fp8 = CASES[case]
    kvs, table = pools(batch, context, hkv, d, fp8, layers, values)
    q = torch.randn(batch, h, d, device="cuda", dtype=torch.bfloat16)
    pos = torch.full((batch,), context - 1, device="cuda")
    floor_us = 1e6 * 2 * batch * context * hkv * d * kvs[0][0].element_size() / bandwidth
    k0, v0, s0 = kvs[0]
    ref = ak.decode_attention(q, k0, v0, table, pos, context, ak.ATTENTION_CONFIGS[0], kv_scale=s0).float()
    rows = []
    for kt, (*tile, splits) in itertools.product([only] if only is not None else (False, True), configs):
        cfg = tuple(tile)
        run = lambda k, v, s, t=ak.Tile(*cfg, kt, splits): ak.decode_attention(
            q, k, v, table, pos, context, t, kv_scale=s
        )
        try:
            err = (run(k0, v0, s0).float() - ref).abs().max().item()
            us = 1e3 * graph_ms(lambda: [run(*kv) for kv in kvs], reps=10) / layers
        except Exception as exc:  # out of shared memory / registers for this tile: no candidate
            log.info("%s %s kt=%s splits=%s left out: %s", case, cfg, kt, splits, str(exc)[:120])
            continue
        rows.append(
            {
                "case": case,
                "batch": batch,
                "context": context,
                "splits": splits,
                "keys_transposed": kt,
                "values": values,
                "config": str(cfg),
                "us_per_layer": round(us, 1),
                "share_of_floor": round(floor_us / us, 3),
                "max_err": round(err, 4),
            }
        )
    return rows


def best(rows: list[dict]) -> list[dict]:
    """The fastest row of each (case, batch, context, form, splits, value layout)."""
    keyed = {}
    for r in rows:
        k = (r["case"], r["batch"], r["context"], r["keys_transposed"], r["splits"], r["values"])
        if k not in keyed or r["us_per_layer"] < keyed[k]["us_per_layer"]:
            keyed[k] = r
    return list(keyed.values())


def fastest_form(rows: list[dict]) -> bool:
    """The form (keys transposed or not) whose best time summed over the batches is least, values
    laid out as the engine lays them where those were timed."""
    totals, engine = {}, [r for r in rows if r["values"] == "pages"]
    for r in best(engine or rows):
        form = r["keys_transposed"]
        totals[form] = totals.get(form, 0.0) + r["us_per_layer"]
    return min(totals, key=totals.get)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    p.add_argument("--batches", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--contexts", type=int, nargs="+", default=[192])
    p.add_argument("--splits", type=int, nargs="+", default=[1], help="key splits a row (powers of 2)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--value-layouts", nargs="+", choices=VALUE_LAYOUTS, default=["pages"])
    p.add_argument("--grid", action="store_true", help="then every tile in GRID for each case's fastest form")
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--topic", default="attention-sweep")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    bandwidth = copy_bandwidth()
    configs = [(*c, 1) for c in ak.ATTENTION_CONFIGS if 1 in a.splits]
    configs += [(*c, n) for n in a.splits if n > 1 for c in SPLIT_TILES]
    shapes = list(itertools.product(a.batches, a.contexts))
    rows = []
    for case in a.cases:
        mine = [
            r
            for v in a.value_layouts
            for b, c in shapes
            for r in sweep(case, b, c, a.layers, bandwidth, configs, values=v)
        ]
        log.info("%s", best(mine))
        if a.grid:
            form = fastest_form(mine)
            tried = {r["config"] for r in mine if r["keys_transposed"] == form and r["splits"] == 1}
            grid = [(*c, 1) for c in GRID if str(c) not in tried]
            mine += [r for b, c in shapes for r in sweep(case, b, c, a.layers, bandwidth, grid, form)]
            log.info("%s grid, form %s: %s", case, form, best(mine))
        rows += mine
    facts = {"copy_bandwidth_gb_s": round(bandwidth / 1e9), "all": rows}
    print(write_results(a.out, a.topic, facts, best(rows)))


if __name__ == "__main__":
    main()
