"""Model families beyond Llama, each a tiny random checkpoint made with transformers' own config
class: greedy ids identical to HF `generate` (fp32, CPU) through the torch runtime (its reference
ops and its fused torch ops) and through the ONNX export on ONNX Runtime; sliding windows shorter
than the prompts and soft-caps the logits exceed; checkpoints whose features the decoder lacks are
refused at build time, naming what is missing."""

import json
import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the fused kernels on the CPU

from tritonllm.config import EngineConfig
from tritonllm.engine.inprocess import InProcessEngine
from tritonllm.model.modeling import CausalLM, load_hf
from tritonllm.model.prep import prepare_tiny
from tritonllm.runtimes.torch_cuda import TorchCudaRuntime
from tritonllm.text import TokenizerFiles

from ..family_models import BUILD, FAMILIES, WINDOW, family_checkpoint
from .test_engine_parity import PROMPTS, hf_greedy


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_dir(request, smollm2_dir):
    return family_checkpoint(request.param, smollm2_dir)


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
    """The torch runtime on its reference ops and on its fused torch ops (SDPA, fused norms), and
    the ONNX export on ONNX Runtime, each with prompts whole and in pieces of a 16-token budget; the same graph
    through TensorRTRuntime with the ONNX Runtime stand-in for TensorRT (its wiring, not TensorRT)."""
    import shutil

    from tritonllm.build.pipeline import engine_files
    from tritonllm.runtimes.tensorrt import plan as trt_plan
    from tritonllm.runtimes.tensorrt.runtime import TensorRTRuntime

    from . import trt_standin

    hf, prompts, want = expected(family_dir)
    assert_features_are_exercised(family_dir.name.removeprefix("tiny-"), hf, prompts)
    cfg = EngineConfig(max_slots=2, max_context=256, max_tokens_limit=64)
    pieces = EngineConfig(max_slots=2, max_context=256, max_tokens_limit=64, max_prefill_tokens=16)
    for fused in (False, True):
        for c in (cfg, pieces):
            runtime = TorchCudaRuntime(None, c, model=CausalLM(hf), device="cpu", fused_kernels=fused)
            assert greedy(c, prompts, runtime=runtime) == want, (
                f"torch runtime, fused ops {fused}, {c.max_prefill_tokens}"
            )
    onnx_dir = engine_files(family_dir, family_dir.name, cfg, BUILD / "onnx" / family_dir.name)
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
    phi = prepare_tiny(tmp_path / "phi", smollm2_dir, family="phi3", **FAMILIES["phi3"][2])
    with pytest.raises(ValueError, match=r"longrope.*past 512 tokens.*max_context is 1024.*--max-context <= 512"):
        engine_files(phi, "phi", EngineConfig(max_context=1024, max_tokens_limit=128), tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()  # refused before any export


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3", "phi3"])
def test_fused_kernels_give_each_family_hf_greedy_ids(name, smollm2_dir):
    """Triton's interpreter on the CPU, prompts in 16-token pieces (the first on the fused prefill,
    the rest reading the cached past): the fused decode and prefill kernels with QKV biases
    (Qwen2), q/k norms per head (Qwen3, Gemma 3), sliding windows, Gemma's (1 + w) and sandwich
    norms, GeGLU, embedding and query scaling, soft-caps and per-type rotary tables give HF's greedy
    ids. Phi-3's partial rotary is not in the kernels: asking for them fails, naming it."""
    pytest.importorskip("triton")
    hf, prompts, want = expected(family_checkpoint(name, smollm2_dir))
    cfg = EngineConfig(max_slots=2, max_context=128, max_tokens_limit=64, max_prefill_tokens=16)  # in pieces
    make = lambda: TorchCudaRuntime(None, cfg, model=CausalLM(hf), device="cpu", triton_kernels=True, gemv_table={})
    if name == "phi3":
        with pytest.raises(ValueError, match="fused kernels do not compute partial rotary"):
            make()
        return
    assert greedy(cfg, prompts, runtime=make()) == want


CONVERSATION = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "  Where is Paris? "},
    {"role": "assistant", "content": "In France."},
    {"role": "user", "content": "And Rome?"},
]


@pytest.mark.parametrize("name", ["qwen3", "mistral", "phi3", "gemma2"])
def test_family_chat_templates_render_as_transformers_does(name, smollm2_dir):
    """The tokenizer stage's template rendering (jinja2 alone, no transformers) gives the ids of
    transformers' apply_chat_template for each family's turn format; its turn markers are single
    special tokens; the end-of-turn token is one of the engine's EOS ids; a conversation the
    template refuses is refused with the template's own message."""
    from transformers import AutoTokenizer

    from tritonllm.errors import RequestValidationError
    from tritonllm.model.shape import shape_of
    from tritonllm.text import encode_prompt

    ckpt = family_checkpoint(name, smollm2_dir)
    ours, theirs = TokenizerFiles(ckpt), AutoTokenizer.from_pretrained(ckpt)
    want = theirs.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert encode_prompt(ours, json.dumps(CONVERSATION), True, 256) == list(want)
    chat = FAMILIES[name][1]
    for token in chat.special_tokens:
        assert len(ours.encode(token, add_special_tokens=False)) == 1, token
        assert token not in ours.decode(ours.encode(f"a {token} b", add_special_tokens=False))
    end = theirs.convert_tokens_to_ids(chat.end_of_turn)
    assert end in shape_of(load_hf(ckpt)).eos_token_ids
    if name in ("mistral", "gemma2"):  # these templates insist on alternating roles
        with pytest.raises(RequestValidationError, match="alternate|only user and assistant"):
            encode_prompt(ours, json.dumps([{"role": "tool", "content": "x"}] * 2), True, 256)


def test_template_helpers_render_as_transformers_does(tmp_path, smollm2_dir):
    """Templates of real checkpoints call strftime_now (Llama 3.x), break out of loops and dump
    JSON with non-ASCII text: rendered as transformers renders them."""
    from transformers import AutoTokenizer

    template = (
        "{{ strftime_now('%d %b %Y') }}{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{{ m | tojson }}\n{% endfor %}"
    )
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    tok.chat_template = template
    tok.save_pretrained(tmp_path)
    messages = [{"role": "user", "content": "café ✓"}] * 3
    want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert TokenizerFiles(tmp_path).render_chat(messages) == want


@pytest.mark.parametrize("name", ["qwen2-windowed", "phi3", "gemma2", "gemma3"])
def test_half_precision_family_graphs_match_their_fp32_graphs(name, smollm2_dir, tmp_path):
    """The fp16 graph a TensorRT plan is built from, for families whose features add ops (windows
    past the 5 cached + 12 new tokens, caps, partial rotary, per-type rotary): ONNX Runtime runs it
    within 1 % of the fp32 graph."""
    from tritonllm.build.pipeline import engine_files

    from .test_onnx_dtype import assert_fp16_graph_matches_fp32

    ckpt = family_checkpoint(name, smollm2_dir)
    cfg = EngineConfig(max_slots=2, max_context=256, max_tokens_limit=64)
    assert_fp16_graph_matches_fp32(
        ckpt, engine_files(ckpt, f"tiny-{name}", cfg, BUILD / "onnx" / f"tiny-{name}"), tmp_path
    )
