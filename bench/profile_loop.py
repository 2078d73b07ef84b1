"""Host cost of the engine loop per step, the runtime excluded: a runtime that launches and
collects instantly (fixed ids), N streams of `--tokens` tokens each, through the in-process
engine (scheduler, stop checks, response windows, the sinks' queue puts). On a GPU this cost
overlaps the device's step; where it is longer than the step it sets the inter-token latency.

  python -m bench.profile_loop --batch 1 8 64
"""
from __future__ import annotations

import argparse
import time

from tritonllm.config import EngineConfig
from tritonllm.inprocess import InProcessEngine
from tritonllm.modeling import ModelShape


class InstantRuntime:
    """launch/collect with no device: every row gets token 7 (never a stop id here)."""

    def __init__(self, slots: int):
        self.max_slots, self.max_context = slots, 512
        self.shape = ModelShape(num_layers=1, num_heads=1, num_kv_heads=1, head_dim=64, hidden_size=64,
                                vocab_size=1000, max_position_embeddings=512, eos_token_ids=(2,),
                                bos_token_id=None, pad_token_id=None)

    def describe(self) -> dict:
        return {"runtime": "instant"}

    def step(self, inputs):
        raise NotImplementedError("launch/collect only")

    def launch(self, inputs, seqs):
        return [7] * len(inputs)

    def collect(self, handle):
        return handle


def host_ms_per_step(batch: int, tokens: int) -> float:
    cfg = EngineConfig(max_slots=batch, max_context=512, max_tokens_limit=tokens)
    with InProcessEngine(None, cfg, runtime=InstantRuntime(batch)) as eng:
        t0 = time.perf_counter()
        sinks = [eng.submit([1] * 16, max_tokens=tokens, ignore_eos=True, temperature=0.0) for _ in range(batch)]
        for s in sinks:
            s.wait(120)
        elapsed = time.perf_counter() - t0
        steps = eng.loop.stats.decode_steps or 1
    return 1e3 * elapsed / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--tokens", type=int, default=128)
    a = p.parse_args()
    for b in a.batch:
        print(f"batch {b:3d}: {host_ms_per_step(b, a.tokens):.3f} ms host per step")


if __name__ == "__main__":
    main()
