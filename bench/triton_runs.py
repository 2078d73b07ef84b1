"""The Triton half of `bench.bench_llm`: each `--triton-variants` LLM served by a real Triton and
driven by gRPC streaming clients, the engine's and Triton's own counters read around each run."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from bench import triton_trace
from bench.drivers import run_triton
from bench.workloads import engine_dir_for, random_prompts
from tritonllm.build.repository import RepositoryConfig, write_repository
from tritonllm.config import EngineConfig
from tritonllm.triton.server_process import TritonServer

log = logging.getLogger("bench")


def triton_suite(
    a, cfg: EngineConfig, ckpt: Path, engine_dir: Path, vocab: int, results: list, power, texts_for=None
) -> None:
    """Each `--triton-variants` LLM through a real Triton: all in one server, or each in its own
    (`--server-per-variant`: two engines that do not fit on the GPU together, one after the other)."""
    variants = {name: (engine, gpus) for name, engine, gpus in (triton_variant(v, cfg) for v in a.triton_variants)}
    texts_for = texts_for or (lambda ids: " ".join(f"w{i}" for i in ids))
    prompts_for = lambda c: [
        texts_for(p) for p in random_prompts(c * a.rounds, a.prompt_len, vocab, seed=100 + c, shared=a.shared_prefix)
    ]
    groups = [[name] for name in variants] if a.server_per_variant else [list(variants)]
    for i, group in enumerate(groups):
        with variant_server(a, {name: variants[name] for name in group}, ckpt, engine_dir) as server:
            for name in group:
                engine, gpus = variants[name]
                changed = {k: v for k, v in asdict(engine).items() if getattr(cfg, k) != v}
                changed |= {"gpus": gpus} if gpus else {}
                label = "Triton ensemble gRPC stream" + (f" {name} {changed}" if changed else "")
                for c in a.concurrency:
                    prompts = prompts_for(c)
                    run_triton(server.grpc_url, name, prompts[:c], c, a.out_len, power, a.client_procs)  # warm-up
                    triton_row(a, server, name, prompts, c, label, results, power)
            if a.logprobs is not None and i == 0:  # their cost through the first variant, at the most streams
                c = max(a.concurrency)
                label = f"Triton ensemble gRPC stream {group[0]} with logprobs (top {a.logprobs})"
                triton_row(a, server, group[0], prompts_for(c), c, label, results, power, logprob_request(a.logprobs))


def triton_row(a, server, name: str, prompts: list, c: int, label: str, results: list, power, extra=None) -> None:
    """One measured run through the ensemble `name`, with the engine's counters over it in its note."""
    before = engine_counters(server, name)
    t0 = time.monotonic_ns()
    r = run_triton(server.grpc_url, name, prompts, c, a.out_len, power, a.client_procs, extra)
    t1 = time.monotonic_ns()
    r.system = label
    r.note += engine_note(before, engine_counters(server, name), r.ttft_s)
    row = r.row()
    if a.trace_rate:  # the sampled requests read during this row (their files are written as each ends)
        hops = triton_trace.summary(triton_trace.first_token_hops(triton_trace.load(trace_path(a)), name, t0, t1))
        row["note"] += "; " + triton_trace.describe(hops)
        row["triton_trace"] = hops
    results.append(row)
    log.info("%s", results[-1])


@contextlib.contextmanager
def variant_server(a, variants: dict, ckpt: Path, engine_dir: Path):
    """A Triton serving these variants from a fresh repository under `a.work`."""
    repo = Path(a.work) / "model_repository"
    shutil.rmtree(repo, ignore_errors=True)
    for name, (engine, gpus) in variants.items():
        repository = RepositoryConfig(
            name=name,
            engine=engine,
            detokenizer_instances=a.detokenizer_instances,
            tokenizer_instances=a.tokenizer_instances,
            gpus=gpus,
        )
        write_repository(repo, repository, ckpt, engine_dir_for(engine, engine_dir, ckpt))
    env = {"PYTHONPATH": f"{a.server_pythonpath}:{os.environ.get('PYTHONPATH', '')}"} if a.server_pythonpath else {}
    if a.server_hide_gpu:  # Triton's core without CUDA; only the engine's stub sees the GPU
        env.update(
            CUDA_VISIBLE_DEVICES="", TRITONLLM_ENGINE_CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", "0")
        )
    # BYTES tensors must stay in plain host memory for the python stubs on a GPU host
    args = ["--pinned-memory-pool-byte-size=0", "--cuda-memory-pool-byte-size=0:0"] if a.device == "gpu" else []
    if a.trace_rate:
        shutil.rmtree(trace_path(a).parent, ignore_errors=True)
        trace_path(a).parent.mkdir(parents=True)
        args += triton_trace.trace_args(trace_path(a), a.trace_rate)
    log_dir = Path("build/logs/bench")
    try:
        with TritonServer(repo, log_dir=log_dir, startup_timeout_s=600, env=env, extra_args=args) as server:
            yield server
    finally:
        keep_tuning_lines(
            log_dir / "tritonserver.log", Path(a.out) / f"{a.topic}-server-{'+'.join(variants)}-tuning.log"
        )


TUNING_LINE = re.compile(r"(gemv|quantized product) \S+ x\d+: |kernel tables ")  # an engine's start-up choices


def keep_tuning_lines(server_log: Path, dst: Path) -> None:
    """The engines' product choices and timings from a server's log, kept beside the results (the
    next server overwrites its log)."""
    try:
        lines = [line for line in server_log.read_text(errors="replace").splitlines() if TUNING_LINE.search(line)]
    except FileNotFoundError:  # the server never started
        return
    if lines:
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text("\n".join(lines) + "\n")


def trace_path(a) -> Path:
    return Path(a.work) / "triton_trace" / "trace.json"


def logprob_request(top: int) -> dict:
    return {"return_log_probs": True, "top_logprobs": top or None}


ENGINE_COUNTERS = {
    "ttft_sum": ("tritonllm_time_to_first_token_seconds_sum", None),
    "ttft_count": ("tritonllm_time_to_first_token_seconds_count", None),
    "steps": ("tritonllm_loop_steps_total", None),
    "prefill_steps": ("tritonllm_prefill_steps_total", None),
    "prefilled": ("tritonllm_prefilled_sequences_total", None),
    "gpu_idle": ("tritonllm_gpu_idle_seconds_total", None),
    "prefill_tokens": ("tritonllm_prefill_tokens_total", None),
    "prefill_computed": ("tritonllm_prefill_computed_tokens_total", None),
    "tokens": ("tritonllm_tokens_generated_total", None),
    "kernel_compiles": ("tritonllm_kernel_compiles_total", None),
    **{p: ("tritonllm_loop_seconds_total", p) for p in ("launch", "wait", "complete")},
}
STAGE_COUNTERS = {  # Triton's own per-model counters, for each python stage of the ensemble
    "requests": "nv_inference_request_success",
    "execs": "nv_inference_exec_count",
    "queue_us": "nv_inference_queue_duration_us",
    "compute_us": "nv_inference_compute_infer_duration_us",
}
STAGES = ("tokenizer", "engine", "detokenizer")


def engine_counters(server, name: str) -> dict[str, float]:
    """The engine's counters on /metrics (TTFT histogram sum/count, loop steps and time by phase,
    prefill steps and sequences) for the model `<name>_engine`. Published every 0.5 s."""
    from tritonllm.triton.scrape import metric_samples

    time.sleep(0.6)
    wanted = {v: k for k, v in ENGINE_COUNTERS.items()}
    staged = {v: k for k, v in STAGE_COUNTERS.items()}
    out = dict.fromkeys([*ENGINE_COUNTERS, *(f"{st}_{k}" for st in STAGES for k in STAGE_COUNTERS)], 0.0)
    for metric, labels, value in metric_samples(server.metrics()):
        key = wanted.get((metric, labels.get("phase")))
        if key and labels.get("model") == f"{name}_engine":  # summed over the engine's instances
            out[key] += value
        stage = labels.get("model", "").removeprefix(f"{name}_")
        if metric in staged and stage in STAGES:  # summed over the stage's instances
            out[f"{stage}_{staged[metric]}"] += value
    return out


def engine_note(before: dict, after: dict, client_ttft: list[float]) -> str:
    """Mean TTFT at the client vs. inside the engine (the rest is gRPC, the ensemble, the tokenizer
    and the first response's way back), the loop's time per step and how prefills were batched."""
    d = {k: after[k] - before[k] for k in before}
    notes = []
    if d.get("kernel_compiles", 0) > 0:  # each a stall of the engine loop in this row (the server log names it)
        notes.append(f"{d['kernel_compiles']:.0f} kernel compiles during the row")
    if d["ttft_count"] > 0 and client_ttft:
        notes.append(
            f"TTFT mean client {1e3 * sum(client_ttft) / len(client_ttft):.1f} ms, "
            f"in engine {1e3 * d['ttft_sum'] / d['ttft_count']:.1f} ms"
        )
    if d["steps"] > 0:
        notes.append(
            "loop ms/step launch {:.2f} / wait {:.2f} / complete {:.2f}".format(
                *(1e3 * d[p] / d["steps"] for p in ("launch", "wait", "complete"))
            )
        )
        if d.get("gpu_idle", 0.0) > 0:  # measured by GPU runtimes only
            notes.append(f"GPU idle between steps {1e3 * d['gpu_idle'] / d['steps']:.2f} ms/step")
        if d.get("tokens", 0) > 0:  # sequences per step on average: below the streams, requests were in transit
            notes.append(f"mean batch {d['tokens'] / d['steps']:.0f} sequences")
    for stage in STAGES:  # the engine's "compute" is its execute(): validating and enqueueing
        n = d.get(f"{stage}_requests", 0)
        if n > 0:
            notes.append(
                f"{stage} per request: queue {1e-3 * d[f'{stage}_queue_us'] / n:.1f} ms, "
                f"compute {1e-3 * d[f'{stage}_compute_us'] / n:.2f} ms, "
                f"{n / max(d[f'{stage}_execs'], 1):.1f} requests/execution"
            )
    if d["prefill_steps"] > 0:
        notes.append(
            f"{d['prefilled'] / d['prefill_steps']:.1f} prefills/step in {d['prefill_steps']:.0f} of "
            f"{d['steps']:.0f} steps"
        )
    if d.get("prefill_tokens", 0) > 0 and d.get("prefill_computed", 0) > 0:  # reported by the torch runtime
        notes.append(f"prefill computed {d['prefill_computed'] / d['prefill_tokens']:.2f}x its prompt tokens (padding)")
    return "".join(f"; {n}" for n in notes)


def triton_variant(spec: str, base: EngineConfig) -> tuple[str, EngineConfig, tuple[int, ...]]:
    """'name:field=value,...' -> (name, base with those EngineConfig fields replaced, GPUs of its
    engine instances). `gpus=0+1` places one engine instance on each listed GPU (instance kind GPU)."""
    name, _, overrides = spec.partition(":")
    params = {f: str(v) for f, v in asdict(base).items()}
    params.update(kv.split("=", 1) for kv in overrides.split(",") if kv)
    gpus = tuple(int(g) for g in params.pop("gpus", "").split("+") if g)
    return name, EngineConfig.from_parameters(params), gpus
