"""Model families beyond Llama, each a tiny random checkpoint made with transformers' own config
class: greedy ids identical to HF `generate` (fp32, CPU) through the torch runtime's reference ops
and through the ONNX export on ONNX Runtime; checkpoints whose features the decoder lacks are
refused at build time, naming what is missing."""

from pathlib import Path

import pytest

from tritonllm.config import EngineConfig
from tritonllm.engine.inprocess import InProcessEngine
from tritonllm.model.modeling import CausalLM, load_hf
from tritonllm.model.prep import prepare_tiny
from tritonllm.runtimes.torch_cuda import TorchCudaRuntime
from tritonllm.text import TokenizerFiles

from .test_engine_parity import PROMPTS, hf_greedy

BUILD = Path(__file__).resolve().parents[2] / "build"
FAMILIES = {
    "qwen2": {},  # QKV biases
    "qwen3": {},  # q/k RMSNorm per head
    "mistral": {"sliding_window": 4096},  # a window longer than the engine's context: exact
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_dir(request, smollm2_dir):
    family = request.param
    return prepare_tiny(BUILD / "models" / f"tiny-{family}", smollm2_dir, family=family, **FAMILIES[family])


def expected(ckpt, n=12):
    hf, tok = load_hf(ckpt), TokenizerFiles(ckpt)
    prompts = [tok.encode(p) for p in PROMPTS[:3]]
    return hf, prompts, [hf_greedy(hf, ids, n) for ids in prompts]


def test_family_greedy_ids_match_hf_on_the_torch_runtime_and_onnx_runtime(family_dir):
    from tritonllm.build.pipeline import engine_files

    hf, prompts, want = expected(family_dir)
    assert CausalLM(hf).features.qkv_bias == (family_dir.name == "tiny-qwen2")
    cfg = EngineConfig(max_slots=2, max_context=256, max_tokens_limit=64)
    kw = dict(max_tokens=12, temperature=0.0, ignore_eos=True)
    runtime = TorchCudaRuntime(None, cfg, model=CausalLM(hf), device="cpu", fused_kernels=False)
    with InProcessEngine(None, cfg, runtime=runtime) as eng:
        assert [s.wait(120).ids for s in [eng.submit(p, **kw) for p in prompts]] == want
    onnx_dir = engine_files(family_dir, family_dir.name, cfg, BUILD / "onnx" / family_dir.name)
    with InProcessEngine(onnx_dir, cfg) as eng:
        assert [s.wait(120).ids for s in [eng.submit(p, **kw) for p in prompts]] == want


def test_unsupported_families_and_features_are_refused_at_build_time(smollm2_dir, tmp_path):
    from transformers import AutoConfig

    from tritonllm.build.pipeline import engine_files
    from tritonllm.model.families import features

    with pytest.raises(ValueError, match=r"gemma2.*soft-capping.*not implemented.*supported: llama"):
        features(AutoConfig.for_model("gemma2"))
    windowed = prepare_tiny(tmp_path / "windowed", smollm2_dir, family="mistral", sliding_window=64)
    with pytest.raises(ValueError, match=r"sliding window of 64 tokens.*max_context is 256.*--max-context <= 64"):
        engine_files(windowed, "windowed", EngineConfig(max_context=256, max_tokens_limit=128), tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()  # refused before any export
