"""Model families beyond Llama, each a tiny random checkpoint made with transformers' own config
class: greedy ids identical to HF `generate` (fp32, CPU) through the torch runtime (its reference
ops and its fused torch ops) and through the ONNX export on ONNX Runtime; sliding windows shorter
than the prompts and soft-caps the logits exceed; checkpoints whose features the decoder lacks are
refused at build time, naming what is missing."""

from pathlib import Path

import pytest
import torch

from tritonllm.config import EngineConfig
from tritonllm.engine.inprocess import InProcessEngine
from tritonllm.model.modeling import CausalLM, load_hf
from tritonllm.model.prep import prepare_tiny
from tritonllm.runtimes.torch_cuda import TorchCudaRuntime
from tritonllm.text import TokenizerFiles

from .test_engine_parity import PROMPTS, hf_greedy

BUILD = Path(__file__).resolve().parents[2] / "build"
WINDOW = 5  # shorter than every prompt plus its 12 new tokens
LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "short_factor": [1.0, 1.3, 1.7, 2.0, 3.0, 4.0],  # 6 = 16 * 0.75 / 2
    "long_factor": [8.0] * 6,
    "original_max_position_embeddings": 512,
    "partial_rotary_factor": 0.75,
}
GEMMA3_ROPE = {  # Gemma 3's own: local layers plain, global layers linear-scaled on a larger base
    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
}
ALTERNATING = {"sliding_window": WINDOW, "layer_types": ["sliding_attention", "full_attention"]}
FAMILIES = {  # the tiny checkpoint's name -> (model_type, config fields)
    "qwen2": ("qwen2", {}),  # QKV biases
    "qwen2-windowed": ("qwen2", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1}),
    "qwen3": ("qwen3", {}),  # q/k RMSNorm per head
    "mistral": ("mistral", {"sliding_window": WINDOW}),
    "phi3": ("phi3", {"rope_parameters": LONGROPE, "original_max_position_embeddings": 512}),
    "gemma": ("gemma", {"tie_word_embeddings": True}),
    "gemma2": (
        "gemma2",
        {
            **ALTERNATING,
            "tie_word_embeddings": True,
            "query_pre_attn_scalar": 1,  # scale 1: the scores pass the small cap below
            "attn_logit_softcapping": 0.05,
            "final_logit_softcapping": 0.5,
        },
    ),
    "gemma3": ("gemma3_text", {**ALTERNATING, "rope_parameters": GEMMA3_ROPE, "query_pre_attn_scalar": 8}),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_dir(request, smollm2_dir):
    kind, extra = FAMILIES[request.param]
    return prepare_tiny(BUILD / "models" / f"tiny-{request.param}", smollm2_dir, family=kind, **extra)


def expected(ckpt, n=12):
    hf, tok = load_hf(ckpt), TokenizerFiles(ckpt)  # eager attention: HF's reference math
    prompts = [tok.encode(p) for p in PROMPTS[:3]]
    return hf, prompts, [hf_greedy(hf, ids, n) for ids in prompts]


def assert_features_are_exercised(name: str, hf, prompts) -> None:
    """The parity below proves a feature only where the inputs reach it."""
    feats = CausalLM(hf).features
    if "windowed" in name or name in ("mistral", "gemma2", "gemma3"):
        assert feats.sliding_window == WINDOW and min(len(p) for p in prompts) + 12 > WINDOW
    if name == "gemma2":  # logits and attention scores far past their caps: capping changes them
        ids = torch.tensor([prompts[0]])
        with torch.no_grad():
            capped = hf.model(ids).last_hidden_state
            raw = torch.matmul(capped, hf.lm_head.weight.t())
            for layer in hf.model.layers:
                layer.self_attn.attn_logit_softcapping = None
            uncapped = hf.model(ids).last_hidden_state
            for layer in hf.model.layers:
                layer.self_attn.attn_logit_softcapping = feats.attn_softcap
        assert raw.abs().max() > 4 * feats.logit_softcap and (capped - uncapped).abs().max() > 0.1
    assert feats.qkv_bias == name.startswith("qwen2")
    if name in ("gemma", "gemma2"):
        assert hf.config.tie_word_embeddings


def test_family_greedy_ids_match_hf_on_the_torch_runtime_and_onnx_runtime(family_dir):
    from tritonllm.build.pipeline import engine_files

    hf, prompts, want = expected(family_dir)
    assert_features_are_exercised(family_dir.name.removeprefix("tiny-"), hf, prompts)
    cfg = EngineConfig(max_slots=2, max_context=256, max_tokens_limit=64)
    kw = dict(max_tokens=12, temperature=0.0, ignore_eos=True)
    for fused in (False, True):  # the module's reference ops; SDPA and fused norms
        runtime = TorchCudaRuntime(None, cfg, model=CausalLM(hf), device="cpu", fused_kernels=fused)
        with InProcessEngine(None, cfg, runtime=runtime) as eng:
            assert [s.wait(120).ids for s in [eng.submit(p, **kw) for p in prompts]] == want, f"fused ops {fused}"
    onnx_dir = engine_files(family_dir, family_dir.name, cfg, BUILD / "onnx" / family_dir.name)
    with InProcessEngine(onnx_dir, cfg) as eng:
        assert [s.wait(120).ids for s in [eng.submit(p, **kw) for p in prompts]] == want


def test_unsupported_families_and_features_are_refused_at_build_time(smollm2_dir, tmp_path):
    from transformers import AutoConfig

    from tritonllm.build.pipeline import engine_files
    from tritonllm.model.families import features

    with pytest.raises(ValueError, match=r"mixtral.*mixture-of-experts.*not implemented.*supported: llama"):
        features(AutoConfig.for_model("mixtral"))
    with pytest.raises(ValueError, match=r"rope_type 'dynamic'.*supported rope types"):
        features(AutoConfig.for_model("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0}))
    with pytest.raises(ValueError, match=r"activation 'relu2'.*supported"):
        features(AutoConfig.for_model("llama", hidden_act="relu2"))
    phi = prepare_tiny(tmp_path / "phi", smollm2_dir, family="phi3", **FAMILIES["phi3"][1])
    with pytest.raises(ValueError, match=r"longrope.*past 512 tokens.*max_context is 1024.*--max-context <= 512"):
        engine_files(phi, "phi", EngineConfig(max_context=1024, max_tokens_limit=128), tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()  # refused before any export
