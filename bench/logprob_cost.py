"""Host and device time of one step's sampling with and without log-probabilities (64 rows of a
128k vocabulary, bf16 logits on the GPU): what the sampler's launch costs the engine loop.

    python -m bench.logprob_cost        (GPU; writes build/results/{date}-{gpu}-logprob-cost.json)
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.provenance import DEFAULT_OUT, run_facts, write_json
from tritonllm.config import SamplingParams
from tritonllm.engine.sequence import Sequence
from tritonllm.runtimes.torch_cuda import sampling


def measure(logits: torch.Tensor, seqs: list, logprobs: bool, iters: int = 200) -> dict:
    host = 0.0
    for i in range(iters + 20):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        plan = sampling.SamplingPlan(seqs)
        chosen = plan.choose(logits)
        if logprobs:
            plan.logprobs(chosen)
        if i >= 20:
            host += time.perf_counter() - t0
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        chosen = plan.choose(logits)
        if logprobs:
            plan.logprobs(chosen)
    torch.cuda.synchronize()
    return {
        "host_ms": round(1e3 * host / iters, 3),
        "device_bound_ms": round(1e3 * (time.perf_counter() - t0) / iters, 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--top", type=int, nargs="+", default=[0, 5, 20])
    p.add_argument("--out", default=DEFAULT_OUT)
    a = p.parse_args()
    logits = torch.randn(a.rows, a.vocab, device="cuda", dtype=torch.bfloat16)
    report = {}
    for top in [None, *a.top]:
        params = SamplingParams(temperature=0.0, ignore_eos=True, logprobs=top is not None, top_logprobs=top or 0)
        seqs = [Sequence([1, 2], params, frozenset({2}), None) for _ in range(a.rows)]
        name = "no logprobs" if top is None else f"logprobs top {top}"
        report[name] = {"kernels": measure(logits, seqs, top is not None)}
        if top is not None:  # the torch ops the kernels replace, for comparison
            kernels, sampling._KERNELS[:] = sampling._kernels(), [None]
            report[name]["torch ops"] = measure(logits, seqs, True)
            sampling._KERNELS[:] = [kernels]
        print(name, report[name])
    write_json(a.out, "logprob-cost", run_facts(rows=a.rows, vocab=a.vocab, steps=report))


if __name__ == "__main__":
    main()
