"""Where a torch-cuda step of prompt pieces goes (the rows that start after a cached part of their
prompt: prefix-cache hits and chunked prefill), on the GPU, Llama-3.2-1B's shape (random bf16):

- prefix: 64 prompts of a cached 1,024-token prefix + 64 tokens of their own, in one step;
- chunk: one 512-token piece after 512 cached tokens;
- cold: 7 whole 1,088-token prompts (what the prefix saves), for comparison.
Each timed over repeats (device synchronised) with the default piece attention tile and with the
one start-up tuning chose (`tune_pieces`, its timings recorded); the prefix step also under
torch.profiler (top operators by device and by host time) and under cProfile (the host's Python functions by
cumulative time: what the step's host time is, beside the device's). Writes {date}-{gpu}-profile-pieces.json.

    python -m bench.profile_pieces [--repeats 5]"""

from __future__ import annotations

import argparse
import cProfile
import json
import logging
import pstats
import time

import numpy as np
import torch

from bench.families import SMALL, bench_engine_config, random_model
from bench.provenance import DEFAULT_OUT, run_facts, write_json
from tritonllm.model.modeling import CausalLM
from tritonllm.runtimes.base import StepInput
from tritonllm.runtimes.kernels.attention import PIECE_CONFIGS
from tritonllm.runtimes.torch_cuda import TorchCudaRuntime

log = logging.getLogger("bench.profile_pieces")


def timed(run, repeats: int) -> float:
    """Median ms of `run()` (which sets up and steps), the device synchronised around each."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - t0))
    return float(np.median(times))


def top_ops(prof, key: str, n: int = 15) -> list[dict]:
    rows = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:n]
    return [
        {
            "op": e.key,
            "calls": e.count,
            "device_ms": round(e.device_time_total / 1e3, 2),
            "host_ms": round(e.cpu_time_total / 1e3, 2),
        }
        for e in rows
    ]


def top_functions(run, n: int = 25) -> list[dict]:
    """The host's Python functions in one `run()`, by cumulative time (cProfile's overhead
    inflates Python-heavy parts: read the shares, not the absolute ms)."""
    prof = cProfile.Profile()
    prof.runcall(run)
    torch.cuda.synchronize()
    stats = pstats.Stats(prof)
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][3], reverse=True)[:n]
    return [
        {"function": f"{path.rsplit('/', 2)[-1]}:{line}({name})", "calls": calls, "cumulative_ms": round(1e3 * cum, 2)}
        for (path, line, name), (_, calls, _, cum, _) in rows
    ]


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=DEFAULT_OUT)
    a = p.parse_args()
    model = CausalLM(random_model("llama", SMALL))
    rng = np.random.default_rng(0)
    vocab = SMALL["vocab_size"]
    cfg = bench_engine_config(64, max_context=2048, max_tokens_limit=1024)
    rt = TorchCudaRuntime(None, cfg, model=model)
    prefix = rng.integers(3, vocab, 1024).tolist()

    def fresh(slots, tokens):
        for s in slots:
            rt.release_kv(s)
            rt.reserve_kv(s, tokens)

    fresh([0], 1200)
    rt.step([StepInput(0, prefix + rng.integers(3, vocab, 64).tolist(), 0)])  # caches the prefix's blocks

    def prefix_step():  # new suffixes each run: a repeat must not find the last run's cached
        fresh(range(64), 1200)
        rt.step([StepInput(s, prefix + rng.integers(3, vocab, 64).tolist(), 0) for s in range(64)])

    def chunk_step():
        fresh([1], 1100)
        long = rng.integers(3, vocab, 1024).tolist()
        rt.step([StepInput(1, long[:512], 0)])
        rt.step([StepInput(1, long[512:], 512)])

    def cold_step():
        fresh(range(2, 9), 1200)
        rt.step([StepInput(s, rng.integers(3, vocab, 1088).tolist(), 0) for s in range(2, 9)])

    tuned, results = rt.kernels.piece_config, {}
    for config in dict.fromkeys((PIECE_CONFIGS[0], tuned)):  # the default tile beside the tuned one
        rt.kernels.piece_config = config
        rt.warm_pieces()
        for name, run in (
            ("prefix 64 x 64 after 1024", prefix_step),
            ("chunk 512 after 512 (+ first 512)", chunk_step),
            ("cold 7 x 1088", cold_step),
        ):
            run()  # warm-up
            results[f"{name}, piece tile {config}"] = timed(run, a.repeats)
            log.info("%s, piece tile %s: %.1f ms", name, config, results[f"{name}, piece tile {config}"])
    rt.kernels.piece_config = tuned
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        prefix_step()
        torch.cuda.synchronize()
    functions = top_functions(prefix_step)
    out = {
        **run_facts(),
        "median_ms": results,
        "piece_tile_tuned": list(tuned),
        "piece_tile_timings": rt.kernels.piece_report,
        "prefix_step_by_host_function": functions,
        "prefix_step_by_device_time": top_ops(prof, "device_time_total"),
        "prefix_step_by_host_time": top_ops(prof, "cpu_time_total"),
        "stats": rt.stats().__dict__,
    }
    write_json(a.out, "profile-pieces", out)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
