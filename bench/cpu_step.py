"""Time of one ONNX Runtime decode step on the CPU (SmolLM2, fp32), by batch and past length: the
runtime's own step (`OnnxRuntime.step`), no engine loop, best and median of `--repeats`. `step`
repeats one batch (its past stays staged between steps where the runtime keeps it), `restaged`
drops the staged past before each step (a step after a sequence joined or left), `gather` is the
copy of the batch's past out of the slot cache alone.

  python -m bench.cpu_step --batch 1 8 --past 128 512 --out results [--name cpu-step]
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import numpy as np

from bench.measure import write_results
from bench.provenance import DEFAULT_OUT
from tritonllm.config import EngineConfig
from tritonllm.runtimes.base import StepInput
from tritonllm.runtimes.onnx_runtime import OnnxRuntime

log = logging.getLogger("cpu_step")


def timed(fn, repeats: int) -> tuple[float, float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return round(min(times), 2), round(float(np.median(times)), 2)


def measure(rt: OnnxRuntime, batch: int, past: int, repeats: int) -> dict:
    rows = [StepInput(slot, [100 + slot], past) for slot in range(batch)]
    staging = getattr(rt, "staging", None)  # absent before the runtime kept the past staged

    def restaged():
        if staging is not None:
            staging.invalidate()
        rt.step(rows)

    step_best, step_median = timed(lambda: rt.step(rows), repeats)
    _, restaged_median = timed(restaged, repeats)
    _, gather_median = timed(lambda: rt.cache.gather(list(range(batch)), past), repeats)
    return {
        "batch": batch,
        "past": past,
        "step_ms_best": step_best,
        "step_ms_median": step_median,
        "restaged_ms_median": restaged_median,
        "gather_ms_median": gather_median,
    }


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--past", type=int, nargs="+", default=[128, 512])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--name", default="cpu-step")
    a = p.parse_args()
    from bench.workloads import smollm2_onnx

    _, engine_dir = smollm2_onnx()
    cfg = EngineConfig(
        max_slots=max(a.batch),
        max_context=max(a.past) + 64,
        max_tokens_limit=32,
        default_max_tokens=16,
        threads=os.cpu_count() or 1,
    )
    rt = OnnxRuntime(engine_dir, cfg)
    rows = [measure(rt, b, past, a.repeats) for b in a.batch for past in a.past]
    facts = {"model": "SmolLM2-135M-Instruct, ONNX Runtime fp32"}
    log.info("\n%s", write_results(a.out, a.name, facts, rows))


if __name__ == "__main__":
    main()
