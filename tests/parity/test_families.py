"""Model families beyond Llama, each a tiny random checkpoint made with transformers' own config
class: greedy ids identical to HF `generate` (fp32, CPU) through the torch runtime (its reference
ops and its fused torch ops) and through the ONNX export on ONNX Runtime; sliding windows shorter
than the prompts and soft-caps the logits exceed; checkpoints whose features the decoder lacks are
refused at build time, naming what is missing."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the fused kernels on the CPU

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
    """HF's greedy ids for three prompts of 12, 33 and 24 tokens (longer than the window, and split
    into pieces by a 16-token prefill budget)."""
    hf, tok = load_hf(ckpt), TokenizerFiles(ckpt)  # eager attention: HF's reference math
    prompts = [tok.encode(p * 3) for p in PROMPTS[:3]]
    return hf, prompts, [hf_greedy(hf, ids, n) for ids in prompts]


def greedy(cfg: EngineConfig, prompts, engine_dir=None, runtime=None) -> list:
    with InProcessEngine(engine_dir, cfg, runtime=runtime) as eng:
        streams = [eng.submit(p, max_tokens=12, temperature=0.0, ignore_eos=True) for p in prompts]
        return [s.wait(120).ids for s in streams]


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


def test_family_greedy_ids_match_hf_on_every_runtime(family_dir, tmp_path):
    """The torch runtime on its reference ops and on its fused torch ops (SDPA, fused norms); the
    ONNX export on ONNX Runtime, prompts whole and in pieces of a 16-token budget; the same graph
    through TensorRTRuntime with the ONNX Runtime stand-in for TensorRT (its wiring, not TensorRT)."""
    import shutil

    from tritonllm.build.pipeline import engine_files
    from tritonllm.runtimes.tensorrt import plan as trt_plan
    from tritonllm.runtimes.tensorrt.runtime import TensorRTRuntime

    from . import trt_standin

    hf, prompts, want = expected(family_dir)
    assert_features_are_exercised(family_dir.name.removeprefix("tiny-"), hf, prompts)
    cfg = EngineConfig(max_slots=2, max_context=256, max_tokens_limit=64)
    for fused in (False, True):
        runtime = TorchCudaRuntime(None, cfg, model=CausalLM(hf), device="cpu", fused_kernels=fused)
        assert greedy(cfg, prompts, runtime=runtime) == want, f"torch runtime, fused ops {fused}"
    onnx_dir = engine_files(family_dir, family_dir.name, cfg, BUILD / "onnx" / family_dir.name)
    pieces = EngineConfig(max_slots=2, max_context=256, max_tokens_limit=64, max_prefill_tokens=16)
    assert greedy(cfg, prompts, onnx_dir) == want, "ONNX Runtime"
    assert greedy(pieces, prompts, onnx_dir) == want, "ONNX Runtime, prompts in pieces"
    trt_cfg = EngineConfig(runtime="tensorrt", max_slots=2, max_context=256, max_tokens_limit=64, dtype="float32")
    engine_dir = shutil.copytree(onnx_dir, tmp_path / "engine")
    spec = trt_plan.PlanSpec(trt_cfg.max_slots, trt_cfg.max_context, dtype=trt_cfg.dtype)
    key = trt_plan.plan_key(engine_dir / "model.onnx", spec, trt_standin)
    trt_standin.write_plan(engine_dir / "trt" / f"model-{key}.plan", engine_dir / "model.onnx")
    runtime = TensorRTRuntime(engine_dir, trt_cfg, device="cpu", trt=trt_standin)
    assert greedy(trt_cfg, prompts, runtime=runtime) == want, "TensorRTRuntime (stand-in)"


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


@pytest.mark.parametrize("name", ["qwen2", "mistral", "phi3", "gemma2"])
def test_fused_kernels_run_the_families_they_compute_and_refuse_the_others(name, smollm2_dir):
    """Triton's interpreter on the CPU: the fused decode kernels with QKV biases (Qwen2) and a
    sliding window (Mistral) give HF's greedy ids; Phi-3's partial rotary and Gemma 2's norms and
    caps are not in the kernels, so asking for them fails, naming what is missing."""
    pytest.importorskip("triton")
    kind, extra = FAMILIES[name]
    hf, prompts, want = expected(prepare_tiny(BUILD / "models" / f"tiny-{name}", smollm2_dir, family=kind, **extra))
    cfg = EngineConfig(max_slots=2, max_context=128, max_tokens_limit=64)
    make = lambda: TorchCudaRuntime(None, cfg, model=CausalLM(hf), device="cpu", triton_kernels=True, gemv_table={})
    if name in ("phi3", "gemma2"):
        missing = "partial rotary" if name == "phi3" else r"\(1 \+ w\) RMSNorm, sandwich norms, gelu_tanh MLP"
        with pytest.raises(ValueError, match=rf"fused kernels do not compute {missing}"):
            make()
        return
    assert greedy(cfg, prompts, runtime=make()) == want
