"""The per-row kernels of a decode step: residual add + RMSNorm by its warps, plain and rounding
its output per row for an 8-bit product (`fused.add_rms_norm`), and the gated activation rounding
its rows from one block or in two passes (`fused.activate_mul`, `--activation-width`), at a few
batch sizes, each in a CUDA graph of 64 launches (a Llama-3.1-8B step's count of norms) with PDL
where the GPU has it. A program holds a whole row; at one row that program is the whole kernel, so
its warps set how long the chain of loads, sums and stores takes.

    python -m bench.row_kernels --width 4096 --rows 1 64 --warps 4 8 16 [--activation-width 14336]
"""

from __future__ import annotations

import argparse
import logging

import torch

from bench.measure import write_results
from bench.provenance import DEFAULT_OUT
from tritonllm.runtimes.kernels import fused
from tritonllm.runtimes.kernels import pdl as gdc
from tritonllm.runtimes.kernels.timing import graph_ms

log = logging.getLogger("bench.row_kernels")
LAUNCHES = 64


def norm_us(rows: int, width: int, quantize: torch.dtype | None, pdl: bool) -> float:
    """Microseconds per add + norm launch, LAUNCHES of them in a graph."""
    g = torch.Generator(device="cuda").manual_seed(rows)
    x = torch.randn(rows, 1, width, device="cuda", dtype=torch.bfloat16, generator=g)
    residual = torch.randn(rows, 1, width, device="cuda", dtype=torch.bfloat16, generator=g)
    weight = torch.rand(width, device="cuda", dtype=torch.bfloat16, generator=g)
    step = lambda: [fused.add_rms_norm(x, residual, weight, 1e-5, None, quantize, pdl) for _ in range(LAUNCHES)]
    return 1e3 * graph_ms(step, reps=20) / LAUNCHES


def activation_us(rows: int, width: int, pdl: bool) -> float:
    """Microseconds per rounding activation launch on gate/up [rows, 2 x width], LAUNCHES in a graph."""
    g = torch.Generator(device="cuda").manual_seed(rows)
    gate_up = torch.randn(rows, 1, 2 * width, device="cuda", dtype=torch.bfloat16, generator=g)
    step = lambda: [fused.activate_mul(gate_up, "silu", torch.float8_e4m3fn, pdl) for _ in range(LAUNCHES)]
    return 1e3 * graph_ms(step, reps=20) / LAUNCHES


def activation_rows(rows: list[int], width: int, pdl: bool) -> list[dict]:
    """The rounding activation at each row count from one block (WHOLE) and in two passes."""
    table = []
    for n in rows:
        row = {"kernel": "activation, rounded per row", "rows": n, "width": width}
        row["us, one block"] = round(activation_us(n, width, pdl), 2)
        with fused.rounding_in_two_passes():
            row["us, two passes"] = round(activation_us(n, width, pdl), 2)
        log.info("%s", row)
        table.append(row)
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 64])
    p.add_argument("--warps", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--activation-width", type=int, default=0, help="also the activation at this width (0: not)")
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--topic", default="row-kernels")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    pdl = gdc.supported(torch.device("cuda"))
    table, saved = [], fused.NORM_WARPS
    default = fused.norm_warps(a.width)
    for rows in a.rows:
        for name, quantize in (("add + norm", None), ("add + norm, rounded per row", torch.float8_e4m3fn)):
            row = {"kernel": name, "rows": rows, "width": a.width}
            for warps in a.warps:
                fused.NORM_WARPS = (warps, warps)
                row[f"us, {warps} warps"] = round(norm_us(rows, a.width, quantize, pdl), 2)
            fused.NORM_WARPS = saved
            log.info("%s", row)
            table.append(row)
    if a.activation_width:
        table += activation_rows(a.rows, a.activation_width, pdl)
    facts = {"launches_per_graph": LAUNCHES, "pdl": pdl, "default_warps": default}
    print(write_results(a.out, a.topic, facts, table))


if __name__ == "__main__":
    main()
