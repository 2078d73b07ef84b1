"""Benchmark workloads: the Llama-3.2-1B-shaped random bf16 model (built on the GPU, no weights
fetched) with a word-level tokenizer covering its 128256 ids, and SmolLM2 on the CPU."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import torch

LLAMA_1B = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    tie_word_embeddings=True,
    rope_theta=500000.0,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    bos_token_id=0,
    eos_token_id=1,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
)


def llama_1b_random(device="cuda", dtype=torch.bfloat16, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**LLAMA_1B)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def word_tokenizer(vocab_size: int, out_dir: Path) -> Path:
    """tokenizer.json with one word per id ("w0".."wN"): token-accurate prompts of any length."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "w1", "bos_token": "w0"}))
    return out_dir


def random_prompts(n: int, length: int, vocab: int, seed: int = 0, shared: int = 0) -> list[list[int]]:
    """n prompts of `length` random ids, each after the same `shared` ids (a system prompt) where set."""
    rng = np.random.default_rng(seed)
    prefix = np.random.default_rng(10**6).integers(3, vocab, size=shared).tolist()
    return [prefix + rng.integers(3, vocab, size=length).tolist() for _ in range(n)]


def weight_bytes(model) -> int:
    """Bytes a decode step reads per token at batch 1 from an engine's model (`CausalLM`): every
    projection as stored (8-bit weights and their scales are buffers), norm and the LM head; not
    the input embedding table, of which a step reads one row a token."""
    head, scale = model.head()
    stored = (*model.layers.parameters(), *model.layers.buffers(), *model.norm.parameters(), head)
    return sum(t.numel() * t.element_size() for t in (*stored, *([] if scale is None else [scale])))


def copy_bandwidth(nbytes: int = 2 << 30, iters: int = 20) -> float:
    """Device-to-device copy, bytes read + written per second."""
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    return 2 * a.numel() * a.element_size() * iters / (start.elapsed_time(end) / 1e3)


def engine_dir_for(engine, onnx_dir: Path, checkpoint: Path | None = None) -> Path:
    """The engine folder of the config's quantization, made from the fp32 export once (the build's
    own step; int8 and TensorRT's fp8 calibrate on the built-in text with the checkpoint's tokenizer).
    A torch-cuda folder already holds its quantized weights (the GPU bench saves them so), and the
    folder of another scheme than the bench's own, where the bench saved one, sits beside it
    (`scheme_dir`)."""
    from tritonllm.build.pipeline import quantized_graph

    if engine.runtime == "torch-cuda":
        other = scheme_dir(onnx_dir, engine)
        return other if other.exists() else onnx_dir
    if engine.quantization == "none":
        return onnx_dir
    return quantized_graph(onnx_dir, engine, checkpoint)


def scheme_dir(engine_dir: Path, engine) -> Path:
    """Where a GPU bench keeps a torch-cuda engine whose weights' scheme differs from its own
    engine's: beside that engine's folder, named by quantization and LM head."""
    head = "-head" if engine.quantize_lm_head else ""
    return engine_dir.with_name(f"{engine_dir.name}-{engine.quantization}{head}")


def save_scheme_engines(model, engine_dir: Path, base, engines) -> list[Path]:
    """Each torch-cuda engine of `engines` (EngineConfigs) whose quantization or LM head differs
    from `base`'s saved in its `scheme_dir`, quantized from `model` (unquantized) by the build
    step's own functions; the folders written. Folders of earlier runs beside it are removed first
    (one of the bench's own scheme would be taken for it)."""
    from tritonllm.model import quant
    from tritonllm.model.modeling import ENGINE_FILE

    schemes = {(e.quantization, e.quantize_lm_head): e for e in engines if e.runtime == "torch-cuda"}
    schemes.pop((base.quantization, base.quantize_lm_head), None)
    for stale in engine_dir.parent.glob(f"{engine_dir.name}-*"):
        shutil.rmtree(stale)
    written = []
    for (scheme, head), engine in sorted(schemes.items()):
        variant = copy.deepcopy(model)
        if scheme != "none":
            quant.quantize_model(variant, scheme)
        if head:
            quant.quantize_head(variant)
        folder = scheme_dir(engine_dir, engine)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(variant, folder / ENGINE_FILE)
        written.append(folder)
        del variant
    return written


def smollm2_onnx() -> tuple[Path, Path]:
    """The CPU benchmarks' model: the shipped SmolLM2 checkpoint and its ONNX engine folder, made
    once and reused while up to date."""
    from tritonllm.build.pipeline import export_cached
    from tritonllm.model.prep import prepare_smollm2

    ckpt, onnx_dir = prepare_smollm2(Path("build/models/smollm2")), Path("build/onnx/smollm2")
    export_cached(ckpt, onnx_dir)
    return ckpt, onnx_dir
