"""Where a decode step's GPU time goes, per torch-cuda kernel variant (reference ops, fused
kernels with cuBLAS or with the tuned gemv products, fused + torch.compile): captured-graph GPU
time per batch size, the top kernels of one eager step (torch.profiler), the gemv tuning table,
and the floor set by the step's matrix products alone (cuBLAS, one layer's weights timed in a
graph: small ones stay in L2, so this floor is optimistic) and by the weight bytes / bandwidth.

  python -m bench.profile_decode --out results      (GPU; Llama-3.2-1B-shaped random bf16)
"""

from __future__ import annotations

import argparse
import gc
import logging
import time

import torch

from bench.provenance import DEFAULT_OUT, run_facts, write_json
from bench.workloads import copy_bandwidth, llama_1b_random, weight_bytes
from tritonllm.config import EngineConfig
from tritonllm.model.modeling import CausalLM
from tritonllm.runtimes.base import StepInput
from tritonllm.runtimes.kernels.timing import graph_ms, replay_ms

log = logging.getLogger("profile")
VARIANTS = {
    "reference": dict(fused_kernels=False),
    "fused": dict(fused_kernels=True, triton_kernels=False),
    "fused+triton": dict(fused_kernels=True, triton_kernels=True, gemv_table={}),  # cuBLAS products
    "fused+triton+gemv": dict(fused_kernels=True, triton_kernels=True),  # gemv where timed faster
    "fused+compile": dict(fused_kernels=True, triton_kernels=False, torch_compile=True),
}


def gemm_floor_ms(model: CausalLM, batch: int) -> float:
    """The step's matrix products alone (every layer's qkv, o, gate_up, down and the LM head)."""
    x = torch.randn(batch, model.shape.hidden_size, device="cuda", dtype=model.embed.dtype)
    layer = model.layers[0]
    per_layer = 0.0
    for lin in (layer.qkv_proj, layer.o, layer.gate_up, layer.down):
        a = torch.randn(batch, lin.weight.shape[1], device="cuda", dtype=x.dtype)
        per_layer += graph_ms(lambda a=a, w=lin.weight: torch.matmul(a, w.t()), reps=50)
    head = graph_ms(lambda: torch.matmul(x, model.lm_head.t()), reps=50)
    return per_layer * len(model.layers) + head


def top_kernels(step, n: int = 14) -> list[dict]:
    """The kernels of `step()` (one decode or prefill step, launched eagerly), by GPU time."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t:
            rows.append({"kernel": e.key[:90], "calls_per_step": e.count // 3, "us_per_step": round(t / 3, 1)})
    rows.sort(key=lambda r: -r["us_per_step"])
    total = sum(r["us_per_step"] for r in rows)
    kernels = sum(r["calls_per_step"] for r in rows)
    return [{"kernel": "TOTAL", "calls_per_step": kernels, "us_per_step": round(total, 1)}] + rows[:n]


def prompt_rows(b: int, prompt_len: int = 128) -> list[StepInput]:
    """b prompts of prompt_len tokens, one per slot, to prefill."""
    return [StepInput(i, list(range(1, prompt_len + 1)), 0) for i in range(b)]


def prefill_costs(runtime, a, prompt_len: int = 128) -> dict:
    """One prefill step of b prompts, launched eagerly and replayed from its CUDA graph: the host's
    time to enqueue it (the engine loop launches nothing else meanwhile) and the time until the
    device is done (best of 3), and how far the graph's logits are from the eager ones."""

    def timed(fn):
        best = (float("inf"), float("inf"), None)
        for _ in range(3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn()
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            best = min(best, (1e3 * (t1 - t0), 1e3 * (time.perf_counter() - t0), out), key=lambda x: x[:2])
        return {"launch_ms": round(best[0], 2), "done_ms": round(best[1], 2)}, best[2]

    out = {}
    with torch.no_grad():
        for b in (x for x in (1, 8, 23, 32, 64) if x <= runtime.max_slots):
            rows = prompt_rows(b, prompt_len)
            eager, ref = timed(lambda: runtime.forward.prefill(*runtime.prefill_inputs(rows, b, prompt_len)))
            graph, got = timed(lambda: runtime.prefill(rows))
            diff = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            out[b] = {"eager": eager, "graph": graph, "graph_vs_eager_max_rel_diff": round(diff, 5)}
    return out


def profile_variant(name: str, model: CausalLM, a) -> dict:
    from tritonllm.runtimes.torch_cuda import TorchCudaRuntime

    opts = dict(VARIANTS[name])
    cfg = EngineConfig(
        runtime="torch-cuda",
        dtype="bfloat16",
        max_slots=max(a.batches),
        max_context=512,
        max_tokens_limit=511,
        torch_compile=opts.pop("torch_compile", False),
    )
    t0 = time.perf_counter()
    runtime = TorchCudaRuntime(None, cfg, model=model, capture_at_start=False, **opts)
    runtime.forward.positions.fill_(a.context - 1)
    out = {
        "tuning_s": round(time.perf_counter() - t0, 1),
        "graph_ms": {},
        "top_kernels": {},
        "gemv_tuning": runtime.kernels.gemv_report,
        "attention_tuning": runtime.kernels.attention_report,
    }
    for b in a.batches:
        graph, _ = runtime.decode_graph(b, a.context)
        out["graph_ms"][b] = round(replay_ms(graph), 3)
        if "compile" not in name:
            out["top_kernels"][b] = top_kernels(lambda b=b: runtime.forward.decode(b, a.context))
    out["prefill_ms"] = prefill_costs(runtime, a)
    b = max(a.batches)
    out[f"prefill_top_kernels_{b}x128"] = top_kernels(
        lambda: runtime.forward.prefill(*runtime.prefill_inputs(prompt_rows(b), b, 128)), n=20
    )
    log.info("%s: %s prefill %s", name, out["graph_ms"], out["prefill_ms"])
    runtime = None  # frees its device memory before the next variant
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--variants", nargs="+", default=["fused+triton", "fused+triton+gemv"], choices=list(VARIANTS))
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    hf = llama_1b_random()
    bw = copy_bandwidth()
    model = CausalLM(hf).to("cuda", torch.bfloat16)
    del hf
    facts = run_facts(
        gpu=torch.cuda.get_device_name(),
        torch=torch.__version__,
        context=a.context,
        weight_read_floor_ms=round(1e3 * weight_bytes(model) / bw, 3),
    )
    facts["gemm_floor_ms"] = {b: round(gemm_floor_ms(model, b), 3) for b in a.batches}
    log.info("floors: weights %.3f ms, GEMMs %s", facts["weight_read_floor_ms"], facts["gemm_floor_ms"])
    facts["variants"] = {}
    for name in a.variants:
        try:
            facts["variants"][name] = profile_variant(name, model, a)
        except Exception as exc:  # reported, not hidden
            log.exception("variant %s failed", name)
            facts["variants"][name] = {"error": repr(exc)[:400]}
    write_json(a.out, "decode-profile", facts)
    for name, v in facts["variants"].items():
        print(f"{name:15s} graph ms per step: {v.get('graph_ms', v)}")
    print(f"floors: weights/bandwidth {facts['weight_read_floor_ms']} ms, GEMMs alone {facts['gemm_floor_ms']}")


if __name__ == "__main__":
    main()
