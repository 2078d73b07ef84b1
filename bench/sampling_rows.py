"""Time of the device sampler for a batch of rows that sample (temperature > 0), by how many rows
and which filters they ask for: `SamplingPlan(seqs).choose(logits)` on `--device` (the CPU here;
on a GPU host, the host's launch time shows as the wall time of a step that does not wait).

    python -m bench.sampling_rows --rows 1 64 256 --vocab 32000 [--device cuda] [--out results]
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.provenance import run_facts, write_json
from tritonllm.config import SamplingParams
from tritonllm.engine.sampling import new_rng
from tritonllm.engine.sequence import Sequence
from tritonllm.runtimes.torch_cuda.sampling import SamplingPlan

KINDS = {
    "temperature": dict(temperature=0.8, top_p=1.0),
    "top_k 50": dict(temperature=0.8, top_k=50),
    "top_p 0.9": dict(temperature=0.8, top_p=0.9),
    "seeded": dict(temperature=0.8, top_p=1.0, seed=3),
}


def sampling_rows(n: int, params: dict) -> list[Sequence]:
    seqs = []
    for _ in range(n):
        s = Sequence([1, 2], SamplingParams(**params), frozenset({2}), new_rng(0))
        s.prefilled = s.n_prefill  # past its prompt: the row samples
        seqs.append(s)
    return seqs


def ms_per_step(n: int, vocab: int, params: dict, device: str, repeat: int) -> float:
    logits = torch.randn(n, vocab, device=device)
    seqs = sampling_rows(n, params)
    SamplingPlan(seqs).choose(logits.clone())  # warm-up
    times = []
    for _ in range(repeat):
        x = logits.clone()
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        SamplingPlan(seqs).choose(x)
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return round(1e3 * sorted(times)[len(times) // 2], 3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=5, help="steps timed; the median is reported")
    p.add_argument("--out")
    a = p.parse_args()
    rows = []
    for kind in a.kinds:
        for n in a.rows:
            rows.append({"kind": kind, "rows": n, "ms": ms_per_step(n, a.vocab, KINDS[kind], a.device, a.repeat)})
            print(f"{kind:12s} {n:5d} rows: {rows[-1]['ms']:9.3f} ms a step")
    if a.out:
        write_json(a.out, "sampling-rows", run_facts(rows=rows, vocab=a.vocab, device=a.device))


if __name__ == "__main__":
    main()
