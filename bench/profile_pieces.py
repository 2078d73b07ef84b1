"""Where a torch-cuda step of prompt pieces goes (the rows that start after a cached part of their
prompt: prefix-cache hits and chunked prefill), on the GPU, Llama-3.2-1B's shape (random bf16):

- prefix N: N prompts of a cached 1,024-token prefix + 64 tokens of their own, in one step (N = 64,
  16, 4: a burst in one step, or in the steps of a smaller prefill budget);
- chunk: one 512-token piece after 512 cached tokens;
- cold: 7 whole 1,088-token prompts (what the prefix saves), for comparison.
Each launched eagerly and replayed from its CUDA graph (`PieceGraphs`), timed over repeats: the
host's time to launch the step and the time to its end (device synchronised), and the largest
logit difference between the two launches on the same inputs. The 64-prompt step is also
profiled under torch.profiler (top operators by device and by host time) and cProfile (the host's
Python functions by cumulative time). Writes {date}-{gpu}-profile-pieces.json.

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
from tritonllm.runtimes.torch_cuda import TorchCudaRuntime

log = logging.getLogger("bench.profile_pieces")


def timed(run, repeats: int) -> tuple[float, float]:
    """Median ms of launching `run()` (which sets up and steps) and of it to the device's end."""
    launch, total = [], []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        run()
        launch.append(1e3 * (time.perf_counter() - t0))
        torch.cuda.synchronize()
        total.append(1e3 * (time.perf_counter() - t0))
    return float(np.median(launch)), float(np.median(total))


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

    def prefix_step(n: int):  # new suffixes each run: a repeat must not find the last run's cached
        fresh(range(n), 1200)
        rt.step([StepInput(s, prefix + rng.integers(3, vocab, 64).tolist(), 0) for s in range(n)])

    def parity(n: int) -> float:
        """The largest logit difference of n pieces after the prefix, eager against graphed (the
        same pieces twice: the second writes the same keys and values again)."""
        fresh(range(n), 1200)
        rows = [StepInput(s, prefix + rng.integers(3, vocab, 64).tolist(), 0) for s in range(n)]
        pieces, got = rt._take_blocks(rows, 1), []
        for graphed in (False, True):
            rt.graph_pieces = graphed
            got.append(rt.prefill_pieces(pieces).float())
        return float((got[0] - got[1]).abs().max())

    def chunk_step():
        fresh([1], 1100)
        long = rng.integers(3, vocab, 1024).tolist()
        rt.step([StepInput(1, long[:512], 0)])
        rt.step([StepInput(1, long[512:], 512)])

    def cold_step():
        fresh(range(2, 9), 1200)
        rt.step([StepInput(s, rng.integers(3, vocab, 1088).tolist(), 0) for s in range(2, 9)])

    steps = {f"prefix {n} x 64 after 1024": lambda n=n: prefix_step(n) for n in (64, 16, 4)}
    steps.update({"chunk 512 after 512 (+ first 512)": chunk_step, "cold 7 x 1088": cold_step})
    results = {}
    parities = {f"prefix {n}": parity(n) for n in (64, 16, 4)}
    for launch in ("eager", "graphs"):
        rt.graph_pieces = launch == "graphs"
        for name, run in steps.items():
            run()  # warm-up
            launch_ms, total_ms = timed(run, a.repeats)
            results[f"{name}, {launch}"] = {"launch_ms": round(launch_ms, 2), "total_ms": round(total_ms, 2)}
            log.info("%s, %s: %s", name, launch, results[f"{name}, {launch}"])
    profiled = steps["prefix 64 x 64 after 1024"]  # graphed
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        profiled()
        torch.cuda.synchronize()
    functions = top_functions(profiled)
    out = {
        **run_facts(),
        "median_ms": results,
        "max_abs_logits_graphs_vs_eager": parities,
        "graphs": {kind: rt.graphs.count(kind) for kind in ("decode", "prefill", "pieces")},
        "piece_tile_tuned": list(rt.kernels.piece_config),
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
