"""Model families on the GPU (torch-cuda runtime, bf16): greedy first divergence against HF bf16
for a ~1B-shaped random model of each family, and decode tokens/s at batch 1 and 64 for 7-8B
shapes of Llama-3.1-8B, Qwen2.5-7B and Mistral-7B beside each other (do the fused kernels keep
their speed on the other families?).

    python -m bench.families            (GPU; writes build/results/{date}-{gpu}-families.json/.md)
"""

from __future__ import annotations

import argparse
import gc
import logging

import torch

from bench.drivers import run_inprocess
from bench.measure import PowerSampler, write_results
from bench.provenance import DEFAULT_OUT, run_facts, write_json
from bench.workloads import random_prompts
from tritonllm.config import EngineConfig
from tritonllm.engine.inprocess import InProcessEngine
from tritonllm.model.modeling import CausalLM
from tritonllm.model.prep import spread_random_weights
from tritonllm.runtimes.torch_cuda import TorchCudaRuntime

log = logging.getLogger("bench.families")


def shape(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, head_dim: int, vocab: int) -> dict:
    return dict(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
    )


SMALL = shape(2048, 8192, 16, 32, 8, 64, 128256)  # Llama-3.2-1B-like
LARGE = {  # the published shapes (random weights)
    "llama": shape(4096, 14336, 32, 32, 8, 128, 128256),  # Llama-3.1-8B
    "qwen2": shape(3584, 18944, 28, 28, 4, 128, 152064),  # Qwen2.5-7B
    "mistral": {**shape(4096, 14336, 32, 32, 8, 128, 32768), "sliding_window": None},  # Mistral-7B v0.3
}


def random_model(family: str, shape: dict, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, **{"max_position_embeddings": 4096, "tie_word_embeddings": False, **shape})
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    spread_random_weights(model, 0.05)
    return model.eval()


def first_divergence(family: str) -> dict:
    hf = random_model(family, SMALL)
    prompts = random_prompts(4, 32, SMALL["vocab_size"], seed=7)
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor(prompts, device="cuda"), do_sample=False, max_new_tokens=32, min_new_tokens=32, pad_token_id=0
        )[:, 32:].tolist()
    cfg = EngineConfig(runtime="torch-cuda", dtype="bfloat16", max_slots=4, max_context=128, max_tokens_limit=64)
    runtime = TorchCudaRuntime(None, cfg, model=CausalLM(hf))
    with InProcessEngine(None, cfg, runtime=runtime) as eng:
        got = [s.wait().ids for s in [eng.submit(p, max_tokens=32, temperature=0.0, ignore_eos=True) for p in prompts]]
    engine = runtime.describe()
    del hf, runtime
    gc.collect()
    torch.cuda.empty_cache()
    return {
        "first_divergence": [next((i for i, (x, y) in enumerate(zip(g, r)) if x != y), None) for g, r in zip(got, ref)],
        "fused_kernels": engine["fused_kernels"],
    }


def decode_speed(family: str, concurrency: list[int], power: PowerSampler) -> list[dict]:
    hf = random_model(family, LARGE[family])
    cfg = EngineConfig(
        runtime="torch-cuda",
        dtype="bfloat16",
        max_slots=max(concurrency),
        max_context=512,
        max_tokens_limit=511,
        stream_interval_ms=0.0,
        max_responses_per_s=0.0,
    )
    runtime = TorchCudaRuntime(None, cfg, model=CausalLM(hf))
    del hf
    gc.collect()
    rows = []
    with InProcessEngine(None, cfg, runtime=runtime) as eng:
        for c in concurrency:
            prompts = random_prompts(2 * c, 128, LARGE[family]["vocab_size"], seed=c)
            run_inprocess(eng, prompts[:c], c, 32, power)  # warm-up
            r = run_inprocess(eng, prompts, c, 128, power, name=f"{family} ({LARGE[family]['hidden_size']} hidden)")
            rows.append(r.row())
            log.info("%s", rows[-1])
    del runtime, eng
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", default=["llama", "qwen2", "qwen3", "mistral"])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    p.add_argument("--out", default=DEFAULT_OUT)
    a = p.parse_args()
    parity = {f: first_divergence(f) for f in a.families}
    log.info("parity %s", parity)
    facts = {
        "bf16_greedy_first_divergence_vs_hf": parity,
        "small_shape": SMALL,
        "large_shapes": LARGE,
        "workload": "in-process engine, 128 in / 128 out, 2 requests per stream",
    }
    write_json(a.out, "families-parity", run_facts(**facts))  # kept if the slower part runs out of time
    rows = []
    for family in [f for f in a.families if f in LARGE]:
        rows += decode_speed(family, a.concurrency, PowerSampler())
        log.info("\n%s", write_results(a.out, "families", facts, rows))


if __name__ == "__main__":
    main()
