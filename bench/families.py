"""Model families on the GPU (torch-cuda runtime): greedy first divergence against HF for a tiny
and a ~1B-shaped random model of each family, in bf16 and fp32, with HF's logit margin where they
part (a near-tie parts bf16 runs of the same math; a real difference shows a wide margin); and
decode tokens/s at batch 1 and 64 for the published 7-14B shapes side by side (do the fused kernels
keep their speed on the other families, and what does a family they do not compute cost?).

    python -m bench.families --parts parity speed   (GPU; writes {date}-{gpu}-families*.json/.md)
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


TINY = shape(256, 512, 4, 4, 2, 64, 32000)
SMALL = shape(2048, 8192, 16, 32, 8, 64, 128256)  # Llama-3.2-1B-like
WINDOW = 48  # shorter than the 32 + 32 tokens of the parity runs, so the windows are used
LONGROPE = {  # Phi-4-mini's kind: longrope with a partial rotary (48 of 64 dims: 24 factors)
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "short_factor": [1.0 + i / 8 for i in range(24)],
    "long_factor": [4.0] * 24,
    "original_max_position_embeddings": 4096,
    "partial_rotary_factor": 0.75,
}
PARITY = {  # model_type -> config fields beyond the shape: each family's own features switched on
    "llama": {
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    },
    "qwen2": {},
    "qwen3": {},
    "mistral": {"sliding_window": WINDOW},
    "phi3": {"rope_parameters": LONGROPE, "original_max_position_embeddings": 4096},
    "gemma": {"tie_word_embeddings": True},
    "gemma2": {"sliding_window": WINDOW, "query_pre_attn_scalar": 64, "tie_word_embeddings": True},
    "gemma3_text": {"sliding_window": WINDOW, "query_pre_attn_scalar": 64},
}
LARGE = {  # the published shapes (random weights)
    "llama": shape(4096, 14336, 32, 32, 8, 128, 128256),  # Llama-3.1-8B
    "qwen2": shape(3584, 18944, 28, 28, 4, 128, 152064),  # Qwen2.5-7B
    "mistral": {**shape(4096, 14336, 32, 32, 8, 128, 32768), "sliding_window": None},  # Mistral-7B v0.3
    "qwen3": shape(4096, 12288, 36, 32, 8, 128, 151936),  # Qwen3-8B
    "phi3": shape(5120, 17920, 40, 40, 10, 128, 100352),  # Phi-4 (14B)
    "gemma2": {**shape(3584, 14336, 42, 16, 8, 256, 256000), "query_pre_attn_scalar": 256},  # Gemma-2-9B
    "gemma3_text": {**shape(3840, 15360, 48, 16, 8, 256, 262208), "query_pre_attn_scalar": 256},  # Gemma-3-12B
}


def random_model(family: str, fields: dict, dtype=torch.bfloat16, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    base = {"max_position_embeddings": 4096, "tie_word_embeddings": False, "pad_token_id": 0, "bos_token_id": 1}
    config = AutoConfig.for_model(family, **{**base, "eos_token_id": 2, **fields})
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").to(dtype)
    spread_random_weights(model, 0.05)
    return model.eval()


def divergence(family: str, fields: dict, dtype: str, tune: bool) -> dict:
    """Our engine's greedy ids against HF's (eager attention: its reference math) over 4 prompts of
    32 tokens, 32 new; where a row parts, HF's logit margin between its token and ours."""
    hf = random_model(family, fields, getattr(torch, dtype))
    prompts = random_prompts(4, 32, fields["vocab_size"], seed=7)
    with torch.no_grad():
        out = hf.generate(
            torch.tensor(prompts, device="cuda"),
            do_sample=False,
            max_new_tokens=32,
            min_new_tokens=32,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    ref, logits = out.sequences[:, 32:].tolist(), [step.float() for step in out.logits]
    cfg = EngineConfig(runtime="torch-cuda", dtype=dtype, max_slots=4, max_context=128, max_tokens_limit=64)
    runtime = TorchCudaRuntime(None, cfg, model=CausalLM(hf), gemv_table=None if tune else {})
    with InProcessEngine(None, cfg, runtime=runtime) as eng:
        got = [s.wait().ids for s in [eng.submit(p, max_tokens=32, temperature=0.0, ignore_eos=True) for p in prompts]]
    engine = runtime.describe()
    del hf, runtime
    gc.collect()
    torch.cuda.empty_cache()
    firsts = [next((i for i, (x, y) in enumerate(zip(g, r)) if x != y), None) for g, r in zip(got, ref)]
    top2 = torch.stack([step.topk(2, dim=-1).values for step in logits])  # [steps, rows, 2]
    return {
        "first_divergence": firsts,
        "hf_margin_at_divergence": [
            None if i is None else round(float(logits[i][r, ref[r][i]] - logits[i][r, got[r][i]]), 4)
            for r, i in enumerate(firsts)
        ],
        "hf_top2_gap_median": round(float((top2[..., 0] - top2[..., 1]).median()), 4),
        "triton_kernels": engine["triton_kernels"],
    }


def parity(families: list[str], out) -> None:
    """Every family at both sizes and dtypes; the results file is rewritten after each family, so a
    run cut short keeps what it measured."""
    runs = {}
    for family in families:
        for size, shape_fields in (("tiny", TINY), ("1b", SMALL)):
            for dtype in ("bfloat16", "float32"):
                key = f"{family}/{size}/{dtype}"
                runs[key] = divergence(family, {**shape_fields, **PARITY[family]}, dtype, size == "1b")
                log.info("%s %s", key, runs[key])
        facts = {"greedy_divergence_vs_hf": runs, "shapes": {"tiny": TINY, "1b": SMALL}, "fields": PARITY}
        log.info("%s", write_json(out, "families-parity", run_facts(**facts)))


def bench_engine_config(slots: int, **fields) -> EngineConfig:
    """The GPU benchmarks' torch-cuda engine: bf16, 512-token contexts, every token streamed
    (`fields` override any of these)."""
    base = dict(
        runtime="torch-cuda",
        dtype="bfloat16",
        max_context=512,
        max_tokens_limit=511,
        stream_interval_ms=0.0,
        max_responses_per_s=0.0,
    )
    return EngineConfig(max_slots=slots, **{**base, **fields})


def decode_speed(family: str, concurrency: list[int], power: PowerSampler, budgets=(8192,)) -> list[dict]:
    """In-process decode of the family's published shape at each concurrency, for each prefill
    budget (`max_prefill_tokens`: below a step's prompt tokens, prompts go in pieces)."""
    model = CausalLM(random_model(family, LARGE[family]))
    gc.collect()
    rows = []
    for budget in budgets:
        cfg = bench_engine_config(max(concurrency), max_prefill_tokens=budget)
        runtime = TorchCudaRuntime(None, cfg, model=model)
        kernels = "fused kernels" if runtime.describe()["triton_kernels"] else "torch ops"
        name = f"{family} ({LARGE[family]['hidden_size']} hidden, {kernels}, prefill budget {budget})"
        with InProcessEngine(None, cfg, runtime=runtime) as eng:
            for c in concurrency:
                prompts = random_prompts(2 * c, 128, LARGE[family]["vocab_size"], seed=c)
                run_inprocess(eng, prompts[:c], c, 32, power)  # warm-up
                rows.append(run_inprocess(eng, prompts, c, 128, power, name=name).row())
                log.info("%s", rows[-1])
        del runtime, eng
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=["parity", "speed"], default=["parity", "speed"])
    p.add_argument("--families", nargs="+", default=list(PARITY))
    p.add_argument("--speed-families", nargs="+", default=list(LARGE))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    p.add_argument("--prefill-budgets", type=int, nargs="+", default=[8192], help="max_prefill_tokens to compare")
    p.add_argument("--out", default=DEFAULT_OUT)
    a = p.parse_args()
    if "parity" in a.parts:
        parity(a.families, a.out)
    if "speed" in a.parts:
        facts = {"large_shapes": LARGE, "workload": "in-process engine, 128 in / 128 out, 2 requests per stream"}
        rows = []
        for family in a.speed_families:
            rows += decode_speed(family, a.concurrency, PowerSampler(), a.prefill_budgets)
            log.info("\n%s", write_results(a.out, "families", facts, rows))


if __name__ == "__main__":
    main()
