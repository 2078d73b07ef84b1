"""How long the start-up product tuner takes with its candidates checked (and so compiled) on
1 thread against `timing.COMPILE_THREADS` threads: Llama-3.1-8B's four layer products in fp8, a
few layers each, at the decode batch sizes asked (a 64-slot engine's by default). Each variant runs in a fresh process
with an empty OpenAI Triton cache (what a first start on a new machine pays); the tables each chose
are compared (timing noise may pick different tiles where two are within a few percent).

    python -m bench.tune_speed [--threads 1 8 --layers 4 --rows 1 2 4 8 16 32 64]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time

from bench.measure import write_results

log = logging.getLogger("bench.tune_speed")
SHAPES = {"qkv_proj": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def child(threads: int, layers: int, rows: list[int]) -> dict:
    """One tuning in this process with `threads` checking threads; its seconds and table."""
    import torch

    from tritonllm.model import quant
    from tritonllm.runtimes.kernels import gemv, gemv_tuning, timing
    from tritonllm.runtimes.torch_cuda.tuning import ROUNDED_BY_PRODUCER

    timing.COMPILE_THREADS = threads
    g = torch.Generator(device="cuda").manual_seed(0)
    fp8 = lambda n, k: quant.quantize_weight(torch.randn(n, k, device="cuda", generator=g) / 64, "fp8")
    mats = {kind: [(q, None, s) for q, s in (fp8(n, k) for _ in range(layers))] for kind, (n, k) in SHAPES.items()}
    consumers = {kind: gemv.dense for kind in mats}  # every kind tries split tiles, as in the engine
    torch.cuda.synchronize()
    start = time.perf_counter()
    table, _ = gemv_tuning.tune(mats, rows, consumers, pdl=True, rounded=frozenset(ROUNDED_BY_PRODUCER))
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 1), "table": {f"{k} x{m}": str(c) for (k, m), c in sorted(table.items())}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 8])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64], help="decode batch sizes tuned")
    p.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", default="build/results")
    p.add_argument("--topic", default="tune-speed")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if a.child:
        print(json.dumps(child(a.child, a.layers, a.rows)))
        return
    rows, tables = [], {}
    for threads in a.threads:
        env = {**os.environ, "TRITON_CACHE_DIR": tempfile.mkdtemp(prefix="triton-cache-")}
        cmd = [sys.executable, "-m", "bench.tune_speed", "--child", str(threads), "--layers", str(a.layers), "--rows"]
        cmd += [str(r) for r in a.rows]
        done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=True)  # its log: ours
        got = json.loads(done.stdout.strip().splitlines()[-1])
        tables[threads] = got["table"]
        rows.append({"checking threads": threads, "tuning s": got["seconds"], "entries": len(got["table"])})
        log.info("%s", rows[-1])
    first = tables[a.threads[0]]
    for row in rows:
        same = [k for k, c in tables[row["checking threads"]].items() if first.get(k) == c]
        row["entries as the first row's"] = len(same)
    facts = {"layers": a.layers, "rows": a.rows, "shapes": SHAPES, "tables": tables}
    print(write_results(a.out, a.topic, facts, rows))


if __name__ == "__main__":
    main()
