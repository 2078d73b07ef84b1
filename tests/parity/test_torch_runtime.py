"""The PyTorch runtime (static cache, slot-laid decode, device sampler) checked on the CPU in fp32
against HF greedy generate: the same code that runs on the GPU with CUDA graphs and bf16."""
import pytest
import torch

from tritonllm.config import EngineConfig
from tritonllm.inprocess import InProcessEngine
from tritonllm.modeling import CausalLM, load_hf
from tritonllm.runtimes.torch_cuda import TorchCudaRuntime
from tritonllm.text import TokenizerFiles

from .test_engine_parity import PROMPTS, hf_greedy


@pytest.mark.parametrize("fused_kernels", [True, False], ids=["fused", "reference-ops"])
def test_torch_runtime_greedy_matches_hf_with_in_flight_batching(tiny_dir, fused_kernels):
    hf = load_hf(tiny_dir)
    tok = TokenizerFiles(tiny_dir)
    prompts = [tok.encode(p) for p in PROMPTS]
    lengths = [20, 7, 13, 3]
    expected = [hf_greedy(hf, ids, n) for ids, n in zip(prompts, lengths)]
    cfg = EngineConfig(max_slots=3, max_context=160, max_tokens_limit=64)  # 4 requests, 3 slots: one waits, joins
    runtime = TorchCudaRuntime(None, cfg, model=CausalLM(hf), device="cpu", fused_kernels=fused_kernels)
    with InProcessEngine(None, cfg, runtime=runtime) as eng:
        sinks = [eng.submit(ids, max_tokens=n, temperature=0.0, ignore_eos=True) for ids, n in zip(prompts, lengths)]
        got = [s.wait(120).ids for s in sinks]
        assert eng.loop.stats.batched_decode_steps > 0
    assert got == expected


def test_device_sampler_seeded_and_filtered(tiny_dir):
    hf = load_hf(tiny_dir)
    tok = TokenizerFiles(tiny_dir)
    cfg = EngineConfig(max_slots=2, max_context=128, max_tokens_limit=64)
    runtime = TorchCudaRuntime(None, cfg, model=CausalLM(hf), device="cpu")
    ids = tok.encode("Sampling test")
    with InProcessEngine(None, cfg, runtime=runtime) as eng:
        kw = dict(max_tokens=16, temperature=0.9, top_k=40, top_p=0.9, ignore_eos=True)
        a = eng.generate(ids, seed=5, **kw).ids
        b = eng.generate(ids, seed=5, **kw).ids
        c = eng.generate(ids, seed=6, **kw).ids
        bad = eng.generate(ids, max_tokens=16, temperature=0.0, ignore_eos=True).ids
        banned = eng.generate(ids, max_tokens=16, temperature=0.0, ignore_eos=True, bad_ids=[bad[0]]).ids  # flat, -1 separated
    assert a == b and a != c
    assert banned[0] != bad[0]
    assert len(a) == 16
