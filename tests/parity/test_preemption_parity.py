"""Preemption and recompute (kv_policy max-utilization) on the real runtimes, tiny random model in
fp32 on the CPU: a pool too small for the sequences it admits takes blocks back mid-generation, and
every sequence still gets HF's greedy ids, and a seeded sampled one the ids it gets in a roomy pool."""

import pytest

from tritonllm.config import EngineConfig
from tritonllm.engine.inprocess import InProcessEngine
from tritonllm.model.modeling import CausalLM, load_hf
from tritonllm.text import TokenizerFiles

from .test_engine_parity import PROMPTS, hf_greedy

TIGHT = dict(max_context=64, kv_cache_tokens=64, kv_policy="max-utilization")  # 4 blocks of 16


@pytest.mark.parametrize(
    "runtime,budget",
    [("onnxruntime", 8192), ("onnxruntime", 16), ("torch-reference-ops", 8192), ("torch-fused-ops", 16)],
)
def test_preempted_sequences_recompute_to_the_ids_of_an_uncontended_run(tiny_dir, tiny_engine_dir, runtime, budget):
    from tritonllm.runtimes.torch_cuda import TorchCudaRuntime

    hf, tok = load_hf(tiny_dir), TokenizerFiles(tiny_dir)
    prompts = [tok.encode(p) for p in PROMPTS]
    base = dict(max_slots=4, max_tokens_limit=40, default_max_tokens=32, threads=2, max_prefill_tokens=budget)

    def engine(**kw):
        cfg = EngineConfig(**base, **kw)
        if runtime == "onnxruntime":
            return InProcessEngine(tiny_engine_dir, cfg)
        fused = runtime == "torch-fused-ops"
        model = CausalLM(hf)
        return InProcessEngine(
            None, cfg, runtime=TorchCudaRuntime(None, cfg, model=model, device="cpu", fused_kernels=fused)
        )

    greedy = dict(max_tokens=32, temperature=0.0, ignore_eos=True)
    sampled = dict(max_tokens=32, temperature=0.9, top_k=20, ignore_eos=True)
    with engine(**TIGHT) as eng:
        got = [s.wait(120).ids for s in [eng.submit(p, **greedy) for p in prompts]]
        draws = [s.wait(120).ids for s in [eng.submit(p, seed=i, **sampled) for i, p in enumerate(prompts)]]
        preempted = eng.loop.stats.kv_preemptions
        blocks = eng.runtime.blocks
        assert blocks.owed == 0 and all(not t for t in blocks.tables)  # every block given back
    assert preempted > 0
    assert got == [hf_greedy(hf, p, 32) for p in prompts]
    with engine(max_context=64) as eng:
        roomy = [s.wait(120).ids for s in [eng.submit(p, seed=i, **sampled) for i, p in enumerate(prompts)]]
        assert eng.loop.stats.kv_preemptions == 0
    assert draws == roomy
