"""The int8 LM head's product at large batches, each way the tuner may run it: int8 tiles widened
to bf16 in registers (`qmatmul.TILE_CONFIGS`), int8 x int8 tiles on rows rounded to int8
(`qmatmul.X8_TILES`, offered beside fp8 projections), the dequantize + cuBLAS reference, and the
bf16 head's own cuBLAS product (what an unquantized head costs), on Llama-3.1-8B's head
(128,256 x 4,096, random weights) at the rows given. One process, a few seconds of GPU.

    python -m bench.head_products [--rows 128 256 2048]
"""

from __future__ import annotations

import argparse
import logging

import torch
import torch.nn.functional as F

from bench.measure import write_results

log = logging.getLogger("bench.head_products")
VOCAB, HIDDEN = 128256, 4096


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[128, 256, 2048])
    p.add_argument("--out", default="build/results")
    p.add_argument("--topic", default="head-products")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from tritonllm.model import quant
    from tritonllm.runtimes.kernels import qmatmul, timing

    g = torch.Generator(device="cuda").manual_seed(0)
    head = (torch.randn(VOCAB, HIDDEN, device="cuda", generator=g) / 64).to(torch.bfloat16)
    q, scale = quant.quantize_weight(head, quant.HEAD_SCHEME)
    int8_rows = frozenset({"lm_head"})
    int8_tiles = [c for c in qmatmul.candidates(q, False, int8_rows=True) if qmatmul.takes_rounded(c)]
    table, report = qmatmul.tune({"lm_head": [(q, None, scale)]}, a.rows, torch.bfloat16, int8_rows=int8_rows)
    rows = []
    for r in report:
        x = torch.randn(r["rows"], HIDDEN, device="cuda", dtype=torch.bfloat16)
        bf16_us = round(1e3 * timing.graph_ms(lambda x=x: F.linear(x, head)), 1)
        us = r["us"]
        widened = min((us[str(c)] for c in qmatmul.TILE_CONFIGS if str(c) in us), default=None)
        int8x8 = min((us[str(c)] for c in int8_tiles if str(c) in us), default=None)
        rows.append(
            {
                "rows": r["rows"],
                "chosen": r["chosen"],
                "best widened tile us": widened,
                "best int8 x int8 tile us": int8x8,
                "dequantize + cuBLAS us": us.get("reference"),
                "bf16 head cuBLAS us": bf16_us,
            }
        )
        log.info("%s", rows[-1])
    facts = {"head": [VOCAB, HIDDEN], "report": report, "table": {str(k): str(c) for k, c in table.items()}}
    print(write_results(a.out, a.topic, facts, rows))


if __name__ == "__main__":
    main()
