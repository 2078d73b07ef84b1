"""Prefix caching on the CPU engine (ONNX Runtime, SmolLM2-135M): streams whose prompts share a long
system prompt, each with its own short question, with the prefix cache on and off in one run.

    python -m bench.prefix_cache [--prefix 512 --suffix 32 --concurrency 4 --requests 16 --out-len 16]

Prints a table and writes {date}-cpu-prefix-cache.json/.md (command, machine, date, commit)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from bench.drivers import run_inprocess
from bench.measure import PowerSampler, write_results
from bench.provenance import DEFAULT_OUT
from bench.workloads import smollm2_onnx
from tritonllm.config import EngineConfig
from tritonllm.engine.inprocess import InProcessEngine
from tritonllm.text import TokenizerFiles

log = logging.getLogger("bench.prefix_cache")


def shared_prefix_prompts(tok: TokenizerFiles, prefix: int, suffix: int, n: int) -> list[list[int]]:
    """n prompts: the same `prefix` tokens of this file's text, then `suffix` tokens of their own."""
    text = tok.encode(Path(__file__).read_text() * 8, add_special_tokens=False)
    return [text[:prefix] + text[prefix + 97 * i : prefix + 97 * i + suffix] for i in range(n)]


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prefix", type=int, default=512)
    p.add_argument("--suffix", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--out-len", type=int, default=16)
    p.add_argument("--out", default=DEFAULT_OUT)
    a = p.parse_args()
    ckpt, onnx_dir = smollm2_onnx()
    prompts = shared_prefix_prompts(TokenizerFiles(ckpt), a.prefix, a.suffix, a.requests)
    rows, hits = [], {}
    for cached in (False, True):
        cfg = EngineConfig(
            max_slots=a.concurrency,
            max_context=a.prefix + a.suffix + a.out_len + 16,
            max_tokens_limit=a.out_len,
            default_max_tokens=a.out_len,
            threads=os.cpu_count() or 1,
            prefix_cache=cached,
        )
        with InProcessEngine(onnx_dir, cfg) as eng:
            eng.generate(prompts[0], max_tokens=2, temperature=0.0)  # warm-up (and, cached, the prefix's blocks)
            name = f"prefix cache {'on' if cached else 'off'}"
            rows.append(run_inprocess(eng, prompts, a.concurrency, a.out_len, PowerSampler(), name=name).row())
            hits[name] = {"queried_tokens": eng.loop.stats.prefix_queried, "hit_tokens": eng.loop.stats.prefix_hits}
        log.info("%s %s", rows[-1], hits.get(name))
    facts = {
        "workload": f"{a.requests} requests, {a.concurrency} closed-loop streams, {a.prefix}-token shared prefix + "
        f"{a.suffix} own tokens, {a.out_len} out, SmolLM2-135M on ONNX Runtime",
        "prefix_cache_counters": hits,
    }
    print(write_results(a.out, "prefix-cache", facts, rows))


if __name__ == "__main__":
    main()
