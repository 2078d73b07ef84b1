"""Which calls make the engine loop's host wait for the GPU: runs the torch-cuda runtime in the
in-process engine with `torch.cuda.set_sync_debug_mode("warn")` after warm-up and prints each
distinct synchronizing call site (stack inside tritonllm) with its count per step. The overlapped
loop expects none: `collect` waits on a CUDA event for a step launched before the next one, which
the debug mode does not flag (results: results/README.md). It was written after the EOS mask's
host-scalar `-inf` was found and fixed, so it has not been seen catching that one.

  python -m bench.sync_check --batch 1 8 64      (GPU; writes build/results/{date}-{gpu}-sync-check.json)
"""

from __future__ import annotations

import argparse
import collections
import traceback
import warnings
from pathlib import Path

import torch

from bench.provenance import DEFAULT_OUT, run_facts, write_json
from bench.workloads import llama_1b_random, random_prompts
from tritonllm.config import EngineConfig
from tritonllm.engine.inprocess import InProcessEngine
from tritonllm.model.modeling import CausalLM
from tritonllm.runtimes.torch_cuda import TorchCudaRuntime

SITES: collections.Counter = collections.Counter()


def _record(message, category, filename, lineno, file=None, line=None):
    if "synchroniz" not in str(message):
        return
    frames = [f for f in traceback.extract_stack()[:-1] if "tritonllm" in f.filename]
    SITES[" <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-4:]))] += 1


def run(eng, batch: int, out_len: int, logprobs: int | None = None) -> int:
    prompts = random_prompts(batch, 128, eng.runtime.shape.vocab_size, seed=batch)
    extra = {} if logprobs is None else {"return_log_probs": True, "top_logprobs": logprobs or None}
    sinks = [eng.submit(p, max_tokens=out_len, temperature=0.0, ignore_eos=True, **extra) for p in prompts]
    for s in sinks:
        s.wait(300)
    return eng.loop.stats.steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--steps-per-launch", type=int, default=EngineConfig.steps_per_launch)
    p.add_argument("--logprobs", type=int, help="requests ask for log-probabilities (this top_logprobs k)")
    p.add_argument("--out", default=DEFAULT_OUT)
    a = p.parse_args()
    cfg = EngineConfig(
        runtime="torch-cuda",
        dtype="bfloat16",
        max_slots=max(a.batch),
        max_context=512,
        max_tokens_limit=511,
        stream_interval_ms=0.0,
        max_responses_per_s=0.0,
        steps_per_launch=a.steps_per_launch,
    )
    runtime = TorchCudaRuntime(None, cfg, model=CausalLM(llama_1b_random()))
    warnings.showwarning = _record
    warnings.simplefilter("always")
    report = {}
    with InProcessEngine(None, cfg, runtime=runtime) as eng:
        for b in a.batch:
            run(eng, b, a.tokens, a.logprobs)  # warm-up: graphs captured, pinned blocks cached
            SITES.clear()
            steps0 = eng.loop.stats.steps
            torch.cuda.set_sync_debug_mode("warn")
            launch0 = eng.loop.stats.launch_s
            steps = run(eng, b, a.tokens, a.logprobs) - steps0
            launch_ms = 1e3 * (eng.loop.stats.launch_s - launch0) / steps
            torch.cuda.set_sync_debug_mode(0)
            report[b] = {
                "steps": steps,
                "launch_ms_per_step": round(launch_ms, 3),
                "sites_per_step": {k: round(v / steps, 2) for k, v in SITES.most_common()},
            }
            print(f"batch {b}: {steps} steps, launch {launch_ms:.3f} ms/step")
            for site, n in report[b]["sites_per_step"].items():
                print(f"  {n:6.2f}/step  {site}")
    topic = "sync-check" if a.steps_per_launch == 1 else f"sync-check-steps{a.steps_per_launch}"
    topic += "" if a.logprobs is None else f"-logprobs{a.logprobs}"
    write_json(a.out, topic, run_facts(batches=report))


if __name__ == "__main__":
    main()
