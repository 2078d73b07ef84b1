"""The engine at scale on the GPU (torch-cuda, paged KV cache), in-process, one run: Llama-3.2-1B's
shape with random bf16 weights built on the GPU.

    python -m bench.engine_scale [--parts parity capacity prefix variable] [--concurrency 1 64 256 1024]

- parity: greedy ids on the kernels (cold, then with the prefix cached) against the reference ops.
- capacity: max_context 8192, `--capacity-slots` rows, the pool sized by kv_cache_memory_fraction
  0.5 of free memory; the slots a max_context reservation per slot would give for the same pool
  bytes, beside the most 128/128 sequences the engine ran at once with that many closed-loop
  streams; then 128/128 tokens/s at each `--concurrency` on the same engine.
- prefix: 64 streams, a 1,024-token shared prefix + 64 tokens of their own, 128 out, the prefix
  cache off, on from cold (the first 64 arrive together with the prefix not yet cached), and on
  with the prefix cached by the warm-up: TTFT and tokens/s, and how the prompts went through the
  loop (prompts per prefill step, host time per step), at each of `--prefix-budgets`, steps of
  prompt pieces from CUDA graphs or eager (`--piece-launch`).
- variable: 256 streams, input ~ N(512, 128), output ~ N(256, 64) (seeded), whole-prompt prefill
  against chunked prefill (`--variable-budgets`, default 8192 and 512): tokens/s, TTFT, ITL p50/p99.
Writes {date}-{gpu}-engine-scale.json/.md after each part (a run cut short keeps what it measured)."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import logging
import threading
import time

import numpy as np
import torch

from bench.drivers import run_inprocess
from bench.families import SMALL, bench_engine_config, random_model
from bench.measure import PowerSampler, write_results
from bench.provenance import DEFAULT_OUT
from bench.timeline import StepTimeline
from bench.workloads import random_prompts
from tritonllm.engine.inprocess import InProcessEngine
from tritonllm.model.modeling import CausalLM
from tritonllm.runtimes.kernels.compile_watch import WATCH
from tritonllm.runtimes.paged_kv import BLOCK_SIZE
from tritonllm.runtimes.torch_cuda import TorchCudaRuntime
from tritonllm.runtimes.torch_cuda.cache import PagedDeviceCache

log = logging.getLogger("bench.engine_scale")
DEVICE = "cuda"


class PeakActive:
    """Samples the engine's running sequences every millisecond while it is entered."""

    def __init__(self, engine: InProcessEngine):
        self.engine, self.peak, self._stop = engine, 0, threading.Event()

    def _poll(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self.engine.loop.scheduler.active)

    def __enter__(self):
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def engine_for(model: CausalLM, cfg) -> InProcessEngine:
    return InProcessEngine(None, cfg, runtime=TorchCudaRuntime(None, cfg, model=model, device=DEVICE))


def free_memory() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def capacity(model, vocab: int, a, rows: list, facts: dict) -> None:
    cfg = bench_engine_config(
        a.capacity_slots,
        max_context=8192,
        max_tokens_limit=1024,
        kv_cache_memory_fraction=0.5,
        max_queue=4096,
        kv_cache_dtype=a.kv_cache_dtype,
    )
    with engine_for(model, cfg) as eng:
        d = eng.runtime.describe()  # slots of 8192 bf16 positions each: what the same bytes reserved before paging
        per_slot = PagedDeviceCache.bytes_per_block(model.shape, torch.bfloat16) * (8192 // BLOCK_SIZE)
        pool_bytes = d["kv_cache_bytes"]
        streams = a.capacity_slots
        prompts = random_prompts(streams, 128, vocab, seed=11)
        eng.generate(prompts[0], max_tokens=4, temperature=0.0)  # warm-up
        with PeakActive(eng) as peak:
            rows.append(run_inprocess(eng, prompts, streams, 128, PowerSampler(), name="capacity run").row())
        facts["capacity"] = {
            "max_context": 8192,
            "kv_pool_bytes": pool_bytes,
            "kv_pool_tokens": d["kv_cache_tokens"],
            "static_slots_same_bytes": pool_bytes // per_slot,
            "slots": a.capacity_slots,
            "most_sequences_running": peak.peak,
            "kv_waits": eng.loop.scheduler.kv_waits,
        }
        log.info("capacity %s", facts["capacity"])
        for c in a.concurrency:
            prompts = random_prompts(c * a.rounds, 128, vocab, seed=c)
            rows.append(run_inprocess(eng, prompts, c, 128, PowerSampler(), name="paged, max_context 8192").row())
            log.info("%s", rows[-1])


def loop_counters(stats, before) -> dict:
    """The prefix cache's counters, and how the run's prompts went through the loop: prompts per
    prefill step (a burst split over steps waits longer for its first tokens) and the loop's host
    and wait time per step."""
    d = {f: getattr(stats, f) - getattr(before, f) for f in ("prefill_steps", "prefilled", "steps")}
    per_step = lambda f: round(1e3 * (getattr(stats, f) - getattr(before, f)) / max(1, d["steps"]), 3)
    return {
        "queried": stats.prefix_queried,
        "hits": stats.prefix_hits,
        **d,
        "prompts_per_prefill_step": round(d["prefilled"] / max(1, d["prefill_steps"]), 1),
        **{f"{f[:-2]}_ms_per_step": per_step(f) for f in ("launch_s", "wait_s", "complete_s", "gpu_idle_s")},
    }


def shared_prefix(model, vocab: int, a, rows: list, facts: dict) -> None:
    rng = np.random.default_rng(5)
    prefix = rng.integers(3, vocab, 1024).tolist()
    prompts = [prefix + rng.integers(3, vocab, 64).tolist() for _ in range(64 * a.rounds)]
    unrelated = rng.integers(3, vocab, 1088).tolist()
    tail = rng.integers(3, vocab, 64).tolist()
    counters = {}
    for budget, launch, (state, cached, warm) in itertools.product(
        a.prefix_budgets,
        a.piece_launch,
        (("off", False, prompts[0]), ("on, cold", True, unrelated), ("on", True, prompts[0])),
    ):
        cfg = bench_engine_config(
            64, max_context=2048, max_tokens_limit=1024, prefix_cache=cached, max_prefill_tokens=budget
        )
        with engine_for(model, cfg) as eng:
            eng.runtime.graph_pieces = launch == "graphs"
            eng.generate(warm, max_tokens=2, temperature=0.0)  # warm-up; with prompts[0], the prefix's blocks
            if cached:  # and a prompt after a cached past: the piece path's first run is not in the rows
                eng.generate(warm[:1024] + tail, max_tokens=2, temperature=0.0)
            name = f"shared prefix, cache {state}, prefill budget {budget}, pieces {launch}"
            before = dataclasses.replace(eng.loop.stats)
            timeline = StepTimeline(eng.loop, limit=24)
            result = run_inprocess(eng, prompts, 64, 128, PowerSampler(), name=name)
            rows.append(result.row())
            counters[name] = loop_counters(eng.loop.stats, before)
            counters[name]["timeline"] = timeline.detach()  # the first bursts' steps, in order
            counters[name]["ttft_ms"] = sorted(round(1e3 * t, 1) for t in result.ttft_s)
            log.info("%s %s", rows[-1], counters[name])
        eng = None
        free_memory()
    facts["prefix_counters"] = counters


def variable(model, vocab: int, a, rows: list, facts: dict) -> None:
    rng = np.random.default_rng(3)
    n = 256 * a.rounds
    ins = np.clip(rng.normal(512, 128, n), 16, 1024).astype(int)
    outs = np.clip(rng.normal(256, 64, n), 16, 512).astype(int).tolist()
    prompts = [rng.integers(3, vocab, int(k)).tolist() for k in ins]
    facts["variable"] = {"mean_in": float(ins.mean()), "mean_out": float(np.mean(outs)), "requests": n}
    for budget in a.variable_budgets:
        cfg = bench_engine_config(256, max_context=2048, max_tokens_limit=1024, max_prefill_tokens=budget)
        with engine_for(model, cfg) as eng:
            eng.generate(prompts[0], max_tokens=2, temperature=0.0)
            name = f"variable lengths, prefill budget {budget}"
            rows.append(run_inprocess(eng, prompts, 256, 0, PowerSampler(), name=name, out_lens=outs).row())
            log.info("%s", rows[-1])
        eng = None
        free_memory()


def parity(model, vocab: int, a, rows: list, facts: dict) -> None:
    """Greedy ids, 4 prompts (a shared 64-token prefix + 32 of their own) x 32 tokens: the paged
    engine on its kernels cold, then again with the prefix cached, against the reference ops
    (eager, the same block tables): the first divergence of each prompt (bf16 near-ties on random
    weights may part them; the CPU tests compare fp32 ids exactly)."""
    rng = np.random.default_rng(9)
    shared = rng.integers(3, vocab, 64).tolist()
    prompts = [shared + rng.integers(3, vocab, 32).tolist() for _ in range(4)]
    cfg = bench_engine_config(4, max_context=256, max_tokens_limit=64)

    def ids(runtime):
        with InProcessEngine(None, cfg, runtime=runtime) as eng:
            kw = dict(max_tokens=32, temperature=0.0, ignore_eos=True)
            cold = [eng.generate(p, **kw) for p in prompts]
            warm = [eng.generate(p, **kw) for p in prompts]
        return [r.ids for r in cold], [r.ids for r in warm], [r.reused_tokens for r in warm]

    kernels = ids(TorchCudaRuntime(None, cfg, model=model, device=DEVICE))
    ref = ids(TorchCudaRuntime(None, cfg, model=model, device=DEVICE, fused_kernels=False, use_cuda_graphs=False))
    first = lambda xs, ys: [next((i for i, (x, y) in enumerate(zip(g, r)) if x != y), 32) for g, r in zip(xs, ys)]
    facts["parity"] = {
        "kernels_vs_reference_ops": first(kernels[0], ref[0]),
        "warm_vs_cold_kernels": first(kernels[1], kernels[0]),
        "warm_vs_cold_reference_ops": first(ref[1], ref[0]),
        "reused_tokens_warm": kernels[2],
    }
    log.info("parity %s", facts["parity"])


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["parity", "capacity", "prefix", "variable"])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 64, 256, 1024])
    p.add_argument("--capacity-slots", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=2, help="requests per stream")
    p.add_argument(
        "--kv-cache-dtype", choices=["auto", "fp8"], default="auto", help="capacity part: the pool's keys/values"
    )
    p.add_argument("--prefix-budgets", type=int, nargs="+", default=[8192], help="prefix part: max_prefill_tokens")
    p.add_argument(
        "--piece-launch",
        nargs="+",
        choices=["graphs", "eager"],
        default=["graphs"],
        help="prefix part: steps of prompt pieces replayed from CUDA graphs, or launched eagerly",
    )
    p.add_argument("--variable-budgets", type=int, nargs="+", default=[8192, 512], help="variable part: the same")
    p.add_argument("--out", default=DEFAULT_OUT)
    a = p.parse_args()
    hf = random_model("llama", SMALL)
    model, vocab = CausalLM(hf), SMALL["vocab_size"]
    del hf
    rows: list = []
    facts: dict = {"workload": "in-process torch-cuda engine, Llama-3.2-1B shape, random bf16 weights"}
    for part in a.parts:
        t0 = time.perf_counter()
        parts = {"parity": parity, "capacity": capacity, "prefix": shared_prefix, "variable": variable}
        parts[part](model, vocab, a, rows, facts)
        free_memory()
        facts.setdefault("part_seconds", {})[part] = round(time.perf_counter() - t0, 1)
        facts["kernel_compiles_after_start"] = WATCH.count  # each a stall in some row (logged)
        if rows:  # the parity part alone has no rows (its facts go out with the next part's)
            print(write_results(a.out, "engine-scale", facts, rows))


if __name__ == "__main__":
    main()
