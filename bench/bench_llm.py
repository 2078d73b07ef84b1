"""`make bench`: one run compares, on the same weights and batch,
  1. the engine driven in-process (no Triton),
  2. the same engine through the Triton ensemble over gRPC streaming (the real server),
  3. HF transformers `generate` (static cache on the GPU),
  4. the roofline: device copy bandwidth / weight bytes read per decode step (GPU),
and writes a table plus JSON (command, machine, date) under --out.

  GPU: python -m bench.bench_llm --device gpu   (Llama-3.2-1B-shaped random bf16, 128 in / 128 out)
  CPU: python -m bench.bench_llm --device cpu   (SmolLM2-135M fp32, 128 in / 64 out, 2 cores)
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.drivers import run_hf, run_inprocess
from bench.families import LARGE, random_model
from bench.measure import PowerSampler, markdown_table
from bench.provenance import DEFAULT_OUT, result_stem, run_facts
from bench.targets import COLS, render, target_lines
from bench.triton_runs import engine_note, logprob_request, triton_suite, triton_variant
from bench.workloads import (
    copy_bandwidth,
    engine_dir_for,
    llama_1b_random,
    random_prompts,
    save_scheme_engines,
    smollm2_onnx,
    weight_bytes,
    word_tokenizer,
)
from tritonllm.config import EngineConfig
from tritonllm.engine.heap import frozen_heap
from tritonllm.engine.inprocess import InProcessEngine
from tritonllm.model import quant
from tritonllm.model.modeling import ENGINE_FILE, CausalLM
from tritonllm.runtimes.kernels.compile_watch import WATCH

log = logging.getLogger("bench")


def engine_model(a, hf, cfg: EngineConfig, ckpt: Path, engine_dir: Path, vocab: int, facts: dict) -> CausalLM:
    """The bench engine's model from the HF one, quantized as asked (the build step's functions) and,
    for Triton, saved with a tokenizer; each Triton variant of other weights (bf16 beside fp8, the
    int8 head or not) saved first in its own folder, from the bf16 weights."""
    model = CausalLM(hf)
    if "triton" in a.systems:  # Triton variants of other weights (e.g. bf16 beside fp8), each its own folder
        variants = [triton_variant(v, cfg)[1] for v in a.triton_variants]
        facts["variant_engine_dirs"] = [str(d) for d in save_scheme_engines(model, engine_dir, cfg, variants)]
    if a.gpu_quantization != "none":  # the build step's own function: the engine files hold 8-bit weights
        quant.quantize_model(model, a.gpu_quantization)
    if a.gpu_quantize_lm_head:
        quant.quantize_head(model)
    facts["shape"], facts["quantization"] = a.shape, a.gpu_quantization
    facts["quantized_lm_head"] = a.gpu_quantize_lm_head
    facts["weight_bytes"] = weight_bytes(model)  # as the engine stores them: 8-bit weights read at a byte
    facts["roofline_batch1_tokens_per_s"] = round(facts["copy_bandwidth_TBps"] * 1e12 / facts["weight_bytes"], 1)
    if "triton" in a.systems:
        word_tokenizer(vocab, ckpt)
        engine_dir.mkdir(parents=True, exist_ok=True)
        torch.save(model, engine_dir / ENGINE_FILE)
    return model


def gpu_suite(a, results: list, facts: dict) -> None:
    from tritonllm.runtimes.torch_cuda import TorchCudaRuntime

    power = PowerSampler()
    with power:
        time.sleep(2.0)
    facts["idle_watts"] = power.mean_watts()
    facts["copy_bandwidth_TBps"] = round(copy_bandwidth() / 1e12, 3)
    hf = llama_1b_random() if a.shape == "1b" else random_model("llama", LARGE["llama"])
    vocab = hf.config.vocab_size
    parity_prompts = random_prompts(4, 32, vocab, seed=7)
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor(parity_prompts, device="cuda"),
            do_sample=False,
            max_new_tokens=32,
            min_new_tokens=32,
            pad_token_id=0,
        )[:, 32:].tolist()
    for c in a.concurrency if "hf" in a.systems else []:
        torch.cuda.reset_peak_memory_stats()
        results.append(run_hf(hf, random_prompts(c, a.prompt_len, vocab, seed=c), a.out_len, True, power).row())
        log.info("%s", results[-1])
    ckpt, engine_dir = Path(a.work) / f"llama{a.shape}", Path(a.work) / f"llama{a.shape}-engine"
    cfg = EngineConfig(
        runtime="torch-cuda",
        dtype="bfloat16",
        max_slots=max(a.concurrency),
        max_context=a.max_context,
        max_tokens_limit=a.max_context - 1,
        stream_interval_ms=a.stream_interval_ms,
        stream_coalesce_min_active=a.coalesce_min_active,
        response_threads=a.response_threads,
        launch_ahead=a.launch_ahead,
        steps_per_launch=a.steps_per_launch,
        quantization=a.gpu_quantization,
        quantize_lm_head=a.gpu_quantize_lm_head,
        kv_cache_memory_fraction=a.kv_cache_memory_fraction,
        kv_cache_dtype=a.kv_cache_dtype,
        kv_policy=a.kv_policy,
    )
    model = engine_model(a, hf, cfg, ckpt, engine_dir, vocab, facts)
    runtime = TorchCudaRuntime(None, cfg, model=model)
    del hf
    gc.collect()
    torch.cuda.empty_cache()
    facts["engine"] = runtime.describe()

    # in-process every token is delivered as it is made unless --inprocess-responses-per-s sets the
    # served engine's budget (at 1,024 streams a queue put per token is a cost of its own)
    streamed = replace(cfg, stream_interval_ms=0.0, max_responses_per_s=a.inprocess_responses_per_s)
    with InProcessEngine(None, streamed, runtime=runtime) as eng:
        got = [
            s.wait().ids
            for s in [eng.submit(p, max_tokens=32, temperature=0.0, ignore_eos=True) for p in parity_prompts]
        ]
        facts["bf16_greedy_parity_vs_hf"] = {
            "tokens_compared": 32,
            "prompts": 4,
            "first_divergence": [
                next((i for i, (x, y) in enumerate(zip(g, r)) if x != y), None) for g, r in zip(got, ref)
            ],
            "note": f"engine weights {a.gpu_quantization} (none: bf16), batched vs HF bf16; None = identical ids",
        }
        log.info("parity: %s", facts["bf16_greedy_parity_vs_hf"])
    if cfg.steps_per_launch > 1:  # the same prompts with every decode step in multi-step runs
        with InProcessEngine(None, replace(cfg, multi_step_min_active=1), runtime=runtime) as multi:
            runs = [
                s.wait().ids
                for s in [multi.submit(p, max_tokens=32, temperature=0.0, ignore_eos=True) for p in parity_prompts]
            ]
        facts["bf16_greedy_parity_multi_step"] = {
            "same_ids_as_single_steps": runs == got,
            "first_divergence_vs_hf": [
                next((i for i, (x, y) in enumerate(zip(g, r)) if x != y), None) for g, r in zip(runs, ref)
            ],
        }
        log.info("multi-step parity: %s", facts["bf16_greedy_parity_multi_step"])
    # the served engine freezes its heap once built (tritonllm/engine/heap.py): so do these rows
    with (
        frozen_heap(),
        InProcessEngine(None, streamed, runtime=runtime) as eng,
    ):
        for c in a.concurrency if "inprocess" in a.systems else []:
            prompts = random_prompts(c * a.rounds, a.prompt_len, vocab, seed=100 + c, shared=a.shared_prefix)
            run_inprocess(eng, prompts[:c], c, a.out_len, power)  # warm-up: graphs for this batch
            torch.cuda.reset_peak_memory_stats()
            before = replace(eng.loop.stats)
            r = run_inprocess(eng, prompts, c, a.out_len, power)
            r.gpu_mem_gib = torch.cuda.max_memory_allocated() / 2**30
            r.note = engine_note(stats_counters(before), stats_counters(eng.loop.stats), [])[2:]
            results.append(r.row())
            log.info("%s", results[-1])
        if a.logprobs is not None and "inprocess" in a.systems:  # their cost, at the most streams
            c = max(a.concurrency)
            prompts = random_prompts(c * a.rounds, a.prompt_len, vocab, seed=100 + c, shared=a.shared_prefix)
            before = replace(eng.loop.stats)
            r = run_inprocess(eng, prompts, c, a.out_len, power, extra=logprob_request(a.logprobs))
            r.system += f" with logprobs (top {a.logprobs})"
            r.note = engine_note(stats_counters(before), stats_counters(eng.loop.stats), [])[2:]
            results.append(r.row())
            log.info("%s", results[-1])
    facts["kernel_compiles_after_start_in_process"] = WATCH.count  # each a stall in some row (logged)
    facts["decode_step_gpu_ms"] = profile_decode_graphs(runtime, a)
    if a.compile_variant:
        compile_variant(a, runtime.model, cfg, vocab, results, power)
    del runtime, eng
    gc.collect()
    torch.cuda.empty_cache()
    if "triton" in a.systems:
        triton_suite(a, cfg, ckpt, engine_dir, vocab, results, power)


def stats_counters(stats) -> dict[str, float]:
    """An in-process engine's loop stats under the names `engine_note` reads (as on /metrics)."""
    return {
        "ttft_sum": 0.0,
        "ttft_count": 0.0,
        "steps": stats.steps,
        "prefill_steps": stats.prefill_steps,
        "prefilled": stats.prefilled,
        "launch": stats.launch_s,
        "wait": stats.wait_s,
        "complete": stats.complete_s,
        "gpu_idle": stats.gpu_idle_s,
        "kernel_compiles": stats.kernel_compiles,
        "prefill_tokens": stats.prefill_tokens,
        "prefill_computed": stats.prefill_computed,
    }


def profile_decode_graphs(runtime, a) -> dict:
    """Where the time goes: GPU time of one captured decode step per batch size (graph replays
    timed with CUDA events), to compare with the engine's measured inter-token latency."""
    from tritonllm.runtimes.kernels.timing import replay_ms

    out = {}
    ctx = next(c for c in runtime.buckets.context if c >= a.prompt_len + a.out_len)
    for b in a.concurrency:
        graph, _ = runtime.decode_graph(b, ctx)
        out[f"batch{b}_ctx{ctx}"] = round(replay_ms(graph), 3)
    log.info("decode step GPU time (ms): %s", out)
    return out


def compile_variant(a, model, cfg, vocab, results, power) -> None:
    """The same engine with torch.compile'd decode steps (batch 1 only: each shape compiles)."""

    from tritonllm.runtimes.torch_cuda import TorchCudaRuntime

    try:
        one_slot = replace(cfg, max_slots=1, stream_interval_ms=0.0, max_responses_per_s=0.0)
        runtime = TorchCudaRuntime(None, replace(one_slot, torch_compile=True), model=model)
        with InProcessEngine(None, one_slot, runtime=runtime) as eng:
            prompts = random_prompts(3, a.prompt_len, vocab, seed=11)
            t0 = time.perf_counter()
            run_inprocess(eng, prompts[:1], 1, a.out_len, power)
            log.info("compile warm-up %.0fs", time.perf_counter() - t0)
            r = run_inprocess(eng, prompts[1:], 1, a.out_len, power, name="engine in-process, torch.compile")
            results.append(r.row())
            log.info("%s", results[-1])
    except Exception as exc:  # reported, not hidden
        log.exception("torch.compile variant failed")
        results.append({"system": "engine in-process, torch.compile", "note": f"failed: {exc!r}"[:300]})


def cpu_suite(a, results: list, facts: dict) -> None:
    from tritonllm.model.modeling import load_hf
    from tritonllm.text import TokenizerFiles

    ckpt, onnx_dir = smollm2_onnx()
    tok = TokenizerFiles(ckpt)
    base = tok.encode(Path(__file__).read_text() * 4, add_special_tokens=False)
    prompts = [base[i * 37 : i * 37 + a.prompt_len] for i in range(max(a.concurrency) * a.rounds)]
    power = PowerSampler()
    hf = load_hf(ckpt, attention="sdpa")  # HF as users run it
    torch.set_num_threads(os.cpu_count())
    for c in a.concurrency:
        results.append(run_hf(hf, prompts[:c], a.out_len, False, power).row())
        log.info("%s", results[-1])
    del hf
    cfg = EngineConfig(
        max_slots=max(a.concurrency),
        max_context=a.max_context,
        max_tokens_limit=a.max_context - 1,
        stream_interval_ms=a.stream_interval_ms,
    )
    for scheme in a.quantizations:
        q = replace(cfg, quantization=scheme)
        folder = engine_dir_for(q, onnx_dir, ckpt)
        with InProcessEngine(folder, q) as eng, frozen_heap():  # frozen once built, as served
            facts["engine" if scheme == "none" else f"engine {scheme}"] = eng.runtime.describe()
            name = "engine in-process" + ("" if scheme == "none" else f" {scheme}")
            for c in a.concurrency:
                results.append(run_inprocess(eng, prompts[: c * a.rounds], c, a.out_len, power, name=name).row())
                log.info("%s", results[-1])
    if "triton" in a.systems:
        triton_suite(
            a,
            cfg,
            ckpt,
            onnx_dir,
            tok.tokenizer.get_vocab_size(),
            results,
            power,
            texts_for=lambda ids: tok.decode(ids),
        )


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["gpu", "cpu"], required=True)
    p.add_argument("--concurrency", type=int, nargs="+")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument(
        "--shared-prefix",
        type=int,
        default=0,
        help="GPU: ids every prompt starts with (a system prompt) before its own --prompt-len; the warm-up "
        "run of each row caches it where the prefix cache is on",
    )
    p.add_argument("--out-len", type=int)
    p.add_argument("--rounds", type=int, default=2, help="requests per concurrent stream")
    p.add_argument("--max-context", type=int, default=512)
    p.add_argument("--stream-interval-ms", type=float, default=0.0)
    p.add_argument(
        "--inprocess-responses-per-s",
        type=float,
        default=0.0,
        help="GPU: the in-process rows' response budget (0: every token; the Triton rows use the engine's, "
        f"{EngineConfig.max_responses_per_s:g} by default)",
    )
    p.add_argument("--response-threads", type=int, default=EngineConfig.response_threads)
    p.add_argument("--launch-ahead", type=int, default=EngineConfig.launch_ahead)
    p.add_argument("--kv-cache-memory-fraction", type=float, default=EngineConfig.kv_cache_memory_fraction)
    p.add_argument(
        "--kv-cache-dtype", choices=["auto", "fp8"], default="auto", help="GPU: the KV cache of every engine in the run"
    )
    p.add_argument(
        "--kv-policy",
        choices=["guaranteed-no-evict", "max-utilization"],
        default=EngineConfig.kv_policy,
        help="GPU: the KV admission policy of every engine in the run (Triton variants may override it)",
    )
    p.add_argument("--steps-per-launch", type=int, default=EngineConfig.steps_per_launch)
    p.add_argument("--client-procs", type=int, default=1, help="load-generating processes for the Triton runs")
    p.add_argument(
        "--coalesce-min-active",
        type=int,
        default=8,
        help="streams generating before --stream-interval-ms coalescing starts",
    )
    p.add_argument("--tokenizer-instances", type=int, default=1)
    p.add_argument("--detokenizer-instances", type=int, default=1)
    p.add_argument(
        "--triton-variants",
        nargs="+",
        default=["bench"],
        metavar="NAME[:FIELD=VALUE,...]",
        help="LLMs served side by side in the Triton run, each with EngineConfig overrides, e.g. "
        "bench onehop:emit_text=True slow_gil:emit_text=True,switch_interval_ms=5",
    )
    p.add_argument(
        "--server-per-variant",
        action="store_true",
        help="serve each --triton-variants LLM in its own Triton, one after the other (engines that do not "
        "fit on the GPU together)",
    )
    p.add_argument("--systems", nargs="+", default=["hf", "inprocess", "triton"])
    p.add_argument(
        "--quantizations",
        nargs="+",
        default=["none"],
        choices=["none", "int8", "int4"],
        help="CPU: the in-process engine with each of these ONNX Runtime schemes (Triton: --triton-variants "
        "NAME:quantization=int8)",
    )
    p.add_argument("--shape", choices=["1b", "8b"], default="1b", help="GPU: Llama-3.2-1B or Llama-3.1-8B shape")
    p.add_argument(
        "--gpu-quantization",
        choices=["none", "fp8", "int8-wo"],
        default="none",
        help="GPU: the torch-cuda engine's weights (in-process and through Triton; the HF rows stay bf16)",
    )
    p.add_argument(
        "--gpu-quantize-lm-head",
        action="store_true",
        help="GPU: the engine's LM head in int8 too (EngineConfig.quantize_lm_head; the HF rows stay bf16)",
    )
    p.add_argument("--server-pythonpath", help="prepended to PYTHONPATH of the Triton server's python stubs")
    p.add_argument("--server-hide-gpu", action="store_true", help="run Triton's core without CUDA (engine keeps it)")
    p.add_argument("--compile-variant", action="store_true", help="also time torch.compile'd decode (GPU, batch 1)")
    p.add_argument(
        "--logprobs", type=int, help="also run the most streams with return_log_probs and this top_logprobs k"
    )
    p.add_argument(
        "--trace-rate",
        type=int,
        default=0,
        help="Triton runs: trace every n-th request (Triton's trace) and report where its first token went (0: off)",
    )
    p.add_argument("--work", default="/tmp/tritonllm-bench")
    p.add_argument("--topic", default="bench", help="the results file's topic: {date}-{machine}-{topic}.json")
    p.add_argument("--out", default=DEFAULT_OUT, help="results folder (copy a run into results/ deliberately)")
    a = p.parse_args()
    gpu = a.device == "gpu"
    if a.gpu_quantize_lm_head and a.gpu_quantization == "none":
        p.error("--gpu-quantize-lm-head quantizes the head of an 8-bit engine: add --gpu-quantization fp8 or int8-wo")
    a.concurrency = a.concurrency or ([1, 8, 64] if gpu else [1, 8])
    a.out_len = a.out_len or (128 if gpu else 64)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    facts = run_facts(
        torch=torch.__version__,
        gpu=torch.cuda.get_device_name() if gpu else None,
        workload=f"prompt {a.prompt_len}, output {a.out_len}, ignore_eos, greedy"
        + (f", every prompt after the same {a.shared_prefix} ids" if a.shared_prefix else ""),
    )
    results: list[dict] = []
    try:
        (gpu_suite if gpu else cpu_suite)(a, results, facts)
    finally:
        name = result_stem(a.topic, facts)
        Path(a.out, f"{name}.json").write_text(json.dumps({"facts": facts, "results": results}, indent=1))
        Path(a.out, f"{name}.md").write_text(render(name, facts, results))
        print(json.dumps(facts, indent=1))
        print(markdown_table(results, COLS))
        print("\n".join(target_lines(facts, results)))


if __name__ == "__main__":
    main()
