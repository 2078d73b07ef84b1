"""How long a long prompt's prefill stalls the streams already generating (CPU, ONNX Runtime,
SmolLM2, in-process): `--streams` greedy streams decode; once each has `--warm` tokens a
`--long`-token prompt arrives. For each `max_prefill_tokens` budget: the streams' largest gap
between two tokens while the long prompt prefills, their inter-token p50, and the long request's
time to first token. A budget below the prompt's length splits it into pieces (chunked prefill),
each step prefilling one piece next to the streams' decodes.

  python -m bench.prefill_stall --budgets 8192 512 256 --out results
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench.measure import write_results
from bench.provenance import DEFAULT_OUT
from tritonllm.config import EngineConfig
from tritonllm.engine.inprocess import InProcessEngine

log = logging.getLogger("prefill_stall")


def run_budget(engine_dir: Path, cfg: EngineConfig, stream_prompts, long_prompt, warm: int, out_len: int) -> dict:
    with InProcessEngine(engine_dir, cfg) as eng:
        eng.generate(stream_prompts[0][:8], max_tokens=2, temperature=0.0)  # warm-up
        sinks = [
            eng.submit(p, max_tokens=out_len, temperature=0.0, ignore_eos=True, stream=True) for p in stream_prompts
        ]
        while eng.loop.stats.tokens_generated < warm * len(sinks):
            time.sleep(0.005)
        t_long = time.perf_counter()
        long_sink = eng.submit(long_prompt, max_tokens=4, temperature=0.0, ignore_eos=True, stream=True)
        done = long_sink.wait(600)
        streams = [s.wait(600) for s in sinks]
    first = done.token_times[0]
    gaps = np.concatenate([np.diff(s.token_times) for s in streams])
    during = [b - a for s in streams for a, b in zip(s.token_times, s.token_times[1:]) if b > t_long and a < first]
    return {
        "max_prefill_tokens": cfg.max_prefill_tokens,
        "long_prompt_tokens": len(long_prompt),
        "long_ttft_ms": round(1e3 * (first - t_long), 1),
        "stream_max_gap_during_prefill_ms": round(1e3 * max(during), 1) if during else None,
        "stream_itl_p50_ms": round(1e3 * float(np.percentile(gaps, 50)), 1),
        "stream_itl_p99_ms": round(1e3 * float(np.percentile(gaps, 99)), 1),
    }


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", type=int, nargs="+", default=[8192, 512, 256])
    p.add_argument("--streams", type=int, default=3)
    p.add_argument("--long", type=int, default=1500, help="tokens of the late prompt")
    p.add_argument("--warm", type=int, default=8, help="tokens each stream has before the long prompt arrives")
    p.add_argument("--out-len", type=int, default=96)
    p.add_argument("--out", default=DEFAULT_OUT)
    a = p.parse_args()
    from bench.workloads import smollm2_onnx
    from tritonllm.text import TokenizerFiles

    ckpt, engine_dir = smollm2_onnx()
    text = TokenizerFiles(ckpt).encode(Path(__file__).read_text() * 40, add_special_tokens=False)
    stream_prompts = [text[i * 50 : i * 50 + 32] for i in range(a.streams)]
    base = EngineConfig(max_slots=a.streams + 1, max_context=2048, max_tokens_limit=256, threads=os.cpu_count() or 1)
    rows = []
    for budget in a.budgets:
        rows.append(
            run_budget(
                engine_dir, replace(base, max_prefill_tokens=budget), stream_prompts, text[: a.long], a.warm, a.out_len
            )
        )
        log.info("%s", rows[-1])
    write(a, rows)


def write(a, rows: list[dict]) -> None:
    facts = {
        "model": "SmolLM2-135M-Instruct, ONNX Runtime fp32",
        "workload": f"{a.streams} greedy streams of {a.out_len} tokens; a {a.long}-token prompt arrives "
        f"once each has {a.warm}",
    }
    log.info("\n%s", write_results(a.out, "prefill-stall-cpu", facts, rows))


if __name__ == "__main__":
    main()
