"""Quantized torch-cuda engines on the GPU beside the bf16 engine, in one run: the Llama-3.2-1B and
Llama-3.1-8B shapes (random bf16 weights built on the GPU), each quantized at start (`quant.
quantize_model`, the build step's own function) to int8-wo and fp8.

    python -m bench.quant_speed [--shapes 1b 8b --schemes none int8-wo fp8 fp8+head --concurrency 1 64 256]

For each (shape, scheme):
- the products the engine chose at start-up (gemv tiles, large-batch choices) against the
  dequantized reference on layer 0's weights at the benchmark's row counts (relative error);
- greedy ids of the engine on its kernels against the same quantized weights on the reference
  ops (bf16), 4 prompts x 32 tokens, first divergence (1B shape only: the reference ops are slow);
- in-process decode, 128 in / 128 out, closed-loop streams at each concurrency: tokens/s, TTFT,
  ITL, tokens per joule (`--rounds` requests a stream); batch-1 tokens/s against the weight-read
  roofline (copy bandwidth / bytes of weights read per token).
Writes {date}-{gpu}-quant-speed.json/.md after each shape (a run cut short keeps what it measured)."""

from __future__ import annotations

import argparse
import copy
import gc
import logging
import time
from dataclasses import replace

import torch

from bench.drivers import run_inprocess
from bench.families import LARGE, SMALL, bench_engine_config, random_model
from bench.measure import PowerSampler, write_results
from bench.provenance import DEFAULT_OUT
from bench.workloads import copy_bandwidth, random_prompts, weight_bytes
from tritonllm.config import EngineConfig
from tritonllm.engine.inprocess import InProcessEngine
from tritonllm.model import quant
from tritonllm.model.modeling import CausalLM
from tritonllm.runtimes.kernels import gemv, qmatmul
from tritonllm.runtimes.torch_cuda import TorchCudaRuntime

log = logging.getLogger("bench.quant_speed")
SHAPES = {"1b": SMALL, "8b": LARGE["llama"]}
CHECK_ROWS = (1, 8, 64, 256, 2048)


def kernel_errors(runtime: TorchCudaRuntime) -> dict:
    """{kind xrows: relative error} of the engine's chosen product on layer 0's weights."""
    out, layer = {}, runtime.model.layers[0]
    for kind in quant.PROJECTIONS:
        weight, bias, scale = quant.operands(getattr(layer, kind))
        for rows in CHECK_ROWS:
            x = torch.randn(rows, 1, weight.shape[1], device=weight.device, dtype=torch.bfloat16)
            got = gemv.dense(runtime.forward._project(kind, weight, bias, x, scale)).float().view(rows, -1)
            ref = gemv.reference(x, weight, bias, scale).float().view(rows, -1)
            out[f"{kind} x{rows}"] = round(float((got - ref).norm() / ref.norm()), 5)
    if scale is not None and weight.dtype == torch.float8_e4m3fn:  # the row-quantizing kernel vs torch's rounding
        x = torch.randn(256, weight.shape[1], device=weight.device, dtype=torch.bfloat16) * 4
        (q, s), (ref_q, ref_s) = qmatmul.quantize_rows(x, weight.dtype), quant.quantize_rows(x)
        out["quantize_rows mismatches"] = int((q.float() != ref_q.float()).sum()) + int((s != ref_s).sum())
    return out


def product_bandwidth(runtime: TorchCudaRuntime) -> dict:
    """{kind x rows: GB/s} of the chosen batch-1..8 product over every layer's weight of the kind
    (the tuner's own timing), beside the copy bandwidth: how near each kernel streams its bytes."""
    layers, out = runtime.model.layers, {}
    for r in (r for r in runtime.kernels.gemv_report if r["rows"] <= gemv.MAX_ROWS and r["kind"] in quant.PROJECTIONS):
        weight = quant.operands(getattr(layers[0], r["kind"]))[0]
        nbytes = len(layers) * weight.numel() * weight.element_size()
        out[f"{r['kind']} x{r['rows']}"] = round(nbytes / (r["us"][r["chosen"]] * 1e-6) / 1e9)
    return out


def greedy(runtime: TorchCudaRuntime, cfg: EngineConfig, prompts: list[list[int]]) -> list[list[int]]:
    with InProcessEngine(None, cfg, runtime=runtime) as eng:
        return [
            s.wait(600).ids for s in [eng.submit(p, max_tokens=32, temperature=0.0, ignore_eos=True) for p in prompts]
        ]


def reference_divergence(model: CausalLM, cfg: EngineConfig, kernels: TorchCudaRuntime, vocab: int) -> list[int]:
    prompts = random_prompts(4, 32, vocab, seed=7)
    ref = greedy(TorchCudaRuntime(None, cfg, model=model, fused_kernels=False, use_cuda_graphs=False), cfg, prompts)
    got = greedy(kernels, cfg, prompts)
    return [next((i for i, (x, y) in enumerate(zip(g, r)) if x != y), 32) for g, r in zip(got, ref)]


HEAD = "+head"  # a scheme name's suffix: the LM head quantized too


def engine_label(name: str, scheme: str, kv: str) -> str:
    """An engine's name in the rows and details: shape, scheme, and its KV cache where fp8."""
    return f"{name} {scheme}" + (" kv-fp8" if kv == "fp8" else "")


def run_scheme(
    base: CausalLM,
    name: str,
    scheme: str,
    concurrency: list[int],
    power: PowerSampler,
    bandwidth: float,
    kv: str = "auto",
    rounds: int = 2,
) -> tuple:
    """One engine's rows and details; `bandwidth`: the GPU's copy rate (bytes/s) that the batch-1
    roofline divides by the weight bytes; `kv`: the quantized engines' KV cache dtype (bf16's stays);
    a scheme ending in HEAD (`fp8+head`) quantizes the LM head too (`--quantize-lm-head`);
    `rounds`: requests per stream."""
    model = copy.deepcopy(base)
    weights, head = scheme.removesuffix(HEAD), scheme.endswith(HEAD)
    if weights != "none":
        quant.quantize_model(model, weights)
    if head:
        quant.quantize_head(model)
    kv = kv if weights != "none" else "auto"
    label = engine_label(name, scheme, kv)
    cfg = bench_engine_config(max(concurrency), quantization=weights, kv_cache_dtype=kv, quantize_lm_head=head)
    started = time.perf_counter()
    runtime = TorchCudaRuntime(None, cfg, model=model)
    detail = {
        "start_s": round(time.perf_counter() - started, 1),  # cache, tuning (or its stored tables), graphs
        "kernels": runtime.kernels.describe(),
        "quant_report": runtime.kernels.quant_report,
        "weight_bytes_per_token": weight_bytes(runtime.model),
        "kernel_rel_error": kernel_errors(runtime),
        "product_gb_per_s": product_bandwidth(runtime),
        "gemv_report": [r for r in runtime.kernels.gemv_report if r["rows"] <= gemv.MAX_ROWS],
    }
    roofline = bandwidth / detail["weight_bytes_per_token"]
    vocab = model.shape.vocab_size
    if name == "1b" and weights != "none":
        small = replace(cfg, max_slots=4, max_context=128, max_tokens_limit=64)
        detail["first_divergence_vs_reference_ops"] = reference_divergence(
            model, small, TorchCudaRuntime(None, small, model=model), vocab
        )
    rows = []
    with InProcessEngine(None, cfg, runtime=runtime) as eng:
        for c in concurrency:
            prompts = random_prompts(rounds * c, 128, vocab, seed=c)
            run_inprocess(eng, prompts[:c], c, 32, power)  # warm-up
            row = run_inprocess(eng, prompts, c, 128, power, name=label).row()
            if c == 1:
                row["roofline_share_pct"] = round(100 * row["tokens_per_s"] / roofline, 1)
            rows.append(row)
            log.info("%s", row)
    log.info("%s: %s", label, detail)
    del runtime, eng, model
    gc.collect()
    torch.cuda.empty_cache()
    return rows, detail


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    heads = [s + HEAD for s in quant.SCHEMES]
    p.add_argument("--schemes", nargs="+", choices=["none", *quant.SCHEMES, *heads], default=["none", *quant.SCHEMES])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument(
        "--kv-cache-dtype",
        nargs="+",
        choices=["auto", "fp8"],
        default=["auto"],
        help="the quantized engines' KV cache; each quantized scheme runs with each dtype given",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="requests per stream; energy needs runs of several seconds (NVML's counter moves every 100 ms)",
    )
    p.add_argument("--topic", default="quant-speed")
    p.add_argument("--out", default=DEFAULT_OUT)
    a = p.parse_args()
    rows, details = [], {}
    bandwidth = copy_bandwidth()  # this GPU's: the batch-1 roofline is its copy rate over the weight bytes
    for name in a.shapes:
        base = CausalLM(random_model("llama", SHAPES[name]))
        for scheme, kv in [(s, kv) for s in a.schemes for kv in (["auto"] if s == "none" else a.kv_cache_dtype)]:
            label = engine_label(name, scheme, kv)
            try:
                power = PowerSampler()
                r, details[label] = run_scheme(base, name, scheme, a.concurrency, power, bandwidth, kv, a.rounds)
                rows += r
            except Exception as exc:  # one scheme failing must not lose the others' measurements
                log.exception("%s failed", label)
                details[label] = {"error": repr(exc)[:500]}
            facts = {
                "shapes": {n: SHAPES[n] for n in a.shapes},
                "details": details,
                "workload": f"in-process engine, 128 in / 128 out, {a.rounds} requests per stream",
                "quantized_kv_cache_dtype": a.kv_cache_dtype,
                "copy_bandwidth_TBps": round(bandwidth / 1e12, 3),
            }
            print(write_results(a.out, a.topic, facts, rows or [{"engine": "none measured"}]))
        del base
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
