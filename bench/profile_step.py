"""Where a large decode step's GPU time goes, on the engine as served (paged cache, the start-up
kernel tables, quantized weights, fp8 KV where asked): for each batch, every slot holding
`--context` positions, the decode step replayed from a CUDA graph and a prefill of `--prefill`
prompts of 128 tokens, each with the producers of an FP8 GEMM's input rounding it per row
(`fused rows`) and without (`own quantize`), the decode step with its kernels launched with
programmatic dependent launch and without (`PDL_VARIANTS`, logits compared), with the down product
reading gate_up's product itself and with the activation kernel before it (`gated_variants`), with
the rotary and KV write inside the attention kernel and before it (`rope_variants`), with gate_up's
tile making the activation and with the activation kernel after it (`glu_variants`), with the whole MLP
in one kernel and as tuned otherwise (`mlp_variants`), with the products after each add + norm making
their input and with the add + norm kernels (`normed_variants`), with the activation's
per-row rounding in two passes instead of one block (`fused.rounding_in_two_passes`), the kernels of one
eager decode step by GPU time, and the floors: the step's products alone and the KV bytes it
reads over the copy bandwidth.

  python -m bench.profile_step --shape 8b --quantization fp8 --kv-cache-dtype fp8 --batches 256 1024
"""

from __future__ import annotations

import argparse
import ast
import logging

import torch

from bench.families import bench_engine_config, random_model
from bench.measure import write_results
from bench.profile_decode import top_kernels
from bench.provenance import DEFAULT_OUT
from bench.quant_speed import SHAPES
from bench.workloads import copy_bandwidth
from tritonllm.model import quant
from tritonllm.model.modeling import CausalLM
from tritonllm.runtimes.base import StepInput
from tritonllm.runtimes.kernels import attention_o, fused, gemv, mlp, normed, normed_tuning, qmatmul
from tritonllm.runtimes.kernels import pdl as gdc
from tritonllm.runtimes.kernels.timing import capture, graph_ms, replay_ms
from tritonllm.runtimes.torch_cuda import TorchCudaRuntime
from tritonllm.runtimes.torch_cuda.graphs import bucket_for

log = logging.getLogger("bench.profile_step")
VARIANTS = {"fused rows": True, "own quantize": False}
# the decode step's kernels launched with programmatic dependent launch or not: (PDL, K steps of
# its weight tile each small product asks L2 for before its wait)
PDL_VARIANTS = {"no PDL": (False, 0), "PDL": (True, 0), "PDL + prefetch 1": (True, 1), "PDL + prefetch 4": (True, 4)}


def hold_context(rt: TorchCudaRuntime, batch: int, context: int) -> None:
    """Slots 0..batch-1 each hold `context` positions (their blocks taken; the values are whatever
    the pool holds: the step's time does not depend on them) and decode their next one."""
    for slot in range(batch):
        rt.blocks.ensure(slot, context + 1)
    rt.cache.sync()
    f = rt.forward
    f.positions[:batch].fill_(context)
    f.writes[:batch].copy_(torch.arange(batch, device=f.writes.device))
    f.tokens[:batch].random_(1, rt.shape.vocab_size)


def products_floor_ms(rt: TorchCudaRuntime, rows: int) -> float:
    """The step's products alone at `rows` rows as the tables run them, their inputs already made
    (fp8: already rounded), every layer's weights in turn, plus the LM head."""
    total = 0.0
    for kind in quant.PROJECTIONS:
        mats = [quant.operands(getattr(layer, kind)) for layer in rt.model.layers]
        x = torch.randn(rows, mats[0][0].shape[1], device="cuda", dtype=rt.dtype)
        if mats[0][2] is not None and rt.forward._rounds_input(kind, rows, True):
            x = qmatmul.QuantRows(*qmatmul.quantize_rows(x, mats[0][0].dtype), x.shape, x.dtype)
        total += graph_ms(lambda: [rt.forward._project(kind, w, b, x, s) for w, b, s in mats], reps=10)
    h = torch.randn(rows, rt.shape.hidden_size, device="cuda", dtype=rt.dtype)
    head, scale = rt.model.head()
    return total + graph_ms(lambda: rt.forward._project("lm_head", head, None, h, scale), reps=10)


def kv_bytes(rt: TorchCudaRuntime, batch: int, context: int) -> int:
    """Keys and values a decode step reads: every layer's, at every held position of every row."""
    per_position = 2 * rt.shape.num_kv_heads * rt.shape.head_dim * rt.cache.keys.element_size()
    return per_position * rt.shape.num_layers * batch * (context + 1)


def replayed(step, reps: int = 20) -> tuple[torch.Tensor, float]:
    """(a copy of step()'s output after a replay of its CUDA graph, milliseconds per replay)."""
    graph, out = capture(step)
    ms = replay_ms(graph, reps)
    return out.clone(), ms


def compare(rt: TorchCudaRuntime, batch: int, bucket: int, variants: dict, against: str) -> dict:
    """The decode step's graph under each variant (name: a function that sets it up) side by side,
    each replay's logits against the first's (a variant that changes when or from where kernels
    read, never what they compute: 0 expected)."""
    out, ref = {}, None
    for name, setup in variants.items():
        setup()
        try:
            logits, ms = replayed(lambda: rt.forward.decode(batch, bucket))
        except Exception as exc:  # a launch or capture this GPU/driver refuses: reported, not fatal
            out[f"decode ms, {name}"] = f"failed: {str(exc)[:300]}"
            continue
        ref = logits if ref is None else ref
        out[f"decode ms, {name}"] = round(ms, 4)
        out[f"max |logits - {against}|, {name}"] = (logits.float() - ref.float()).abs().max().item()
    return out


def pdl_variants(rt: TorchCudaRuntime, batch: int, bucket: int) -> dict:
    """The decode step's graph with and without PDL side by side."""
    kernels = rt.kernels
    if not gdc.supported(torch.device("cuda")):
        return {"pdl": "not supported here"}
    saved = kernels.pdl, kernels.prefetch_steps

    def setting(on: bool, steps: int):
        return lambda: (setattr(kernels, "pdl", on), setattr(kernels, "prefetch_steps", steps))

    out = compare(rt, batch, bucket, {n: setting(*v) for n, v in PDL_VARIANTS.items()}, "no PDL")
    kernels.pdl, kernels.prefetch_steps = saved
    return out


def entry_variants(rt: TorchCudaRuntime, batch: int, key: tuple, off: str, on: str, bucket: int):
    """The decode step without and with the table entry `key` (the tuner's, or the fastest tile
    it timed under that key where it chose none), side by side: (compare's columns, the tile,
    whether the tuner chose it), or None where no tile was timed; the table is left as it was."""
    table = rt.kernels.gemv_table
    timed = next((r["us"] for r in rt.kernels.gemv_report if (r["kind"], r["rows"]) == key), {})
    tiles = {c: t for c, t in timed.items() if c.startswith("(")}
    saved = table.pop(key, None)
    tile = saved or (ast.literal_eval(min(tiles, key=tiles.get)) if tiles else None)
    if tile is None:
        return None
    out = compare(rt, batch, bucket, {off: lambda: table.pop(key, None), on: lambda: table.update({key: tile})}, off)
    table.pop(key, None)
    table.update({key: saved} if saved is not None else {})
    return out, tile, saved is not None


def gated_variants(rt: TorchCudaRuntime, batch: int, bucket: int) -> dict:
    """The decode step with the down product reading gate_up's product itself (`down+act`: the
    table's tile, or the fastest gated tile the tuner timed where it chose the activation kernel)
    and with the activation kernel before the table's down tile, side by side."""
    found = entry_variants(rt, batch, (gemv.gated_key("down"), batch), "activation kernel", "gated down", bucket)
    if found is None:
        return {"gated down": "no gated tile timed at this batch"}
    out, tile, chosen = found
    return {**out, "gated tile": str(tile), "gated tile chosen by the tuner": chosen}


def one_kernel_variants(rt: TorchCudaRuntime, batch: int, bucket: int, key: str, off: str, on: str) -> dict:
    """The decode step with the table entry (key, batch) of a kernel that adds into the step's sums
    (the tuner's tile, or the fastest it timed where it kept the step as tuned) and without it,
    side by side; the logits differ by summation order only."""
    found = entry_variants(rt, batch, (key, batch), off, on, bucket)
    if found is None:
        return {key: f"no {key} tile timed at this batch"}
    out, tile, chosen = found
    return {**out, f"{key} tile": str(tile), f"{key} tile chosen by the tuner": chosen}


def mlp_variants(rt: TorchCudaRuntime, batch: int, bucket: int) -> dict:
    """The whole MLP in one kernel (`mlp.KEY`) against the MLP as tuned otherwise."""
    return one_kernel_variants(rt, batch, bucket, mlp.KEY, "MLP as tuned", "MLP in one kernel")


def attention_o_variants(rt: TorchCudaRuntime, batch: int, bucket: int) -> dict:
    """Attention + o in one kernel (`attention_o.KEY`) against the attention kernel then o's tile."""
    return one_kernel_variants(rt, batch, bucket, attention_o.KEY, "attention then o", "attention + o in one kernel")


def glu_variants(rt: TorchCudaRuntime, batch: int, bucket: int) -> dict:
    """The decode step with gate_up's tile making the activation (`gemv.GLU_KEYS`: the tuner's
    pair of tiles, or the fastest pair it timed where it kept the activation kernel) and with
    gate_up's product then the activation as tuned otherwise, side by side."""
    table, keys = rt.kernels.gemv_table, [(k, batch) for k in gemv.GLU_KEYS]
    timed = next((r["us"] for r in rt.kernels.gemv_report if (r["kind"], r["rows"]) == ("glu", batch)), {})
    pairs = {c: t for c, t in timed.items() if c.startswith("((")}
    pair = ast.literal_eval(min(pairs, key=pairs.get)) if pairs else None
    saved = {k: table.pop(k) for k in keys if k in table}
    pair = tuple(saved.values()) if saved else pair
    if pair is None:
        return {"glu": "no glu tile timed at this batch"}
    variants = {
        "gate_up then activation": lambda: [table.pop(k, None) for k in keys],
        "gate_up makes the activation": lambda: table.update(dict(zip(keys, pair))),
    }
    out = compare(rt, batch, bucket, variants, "gate_up then activation")
    for k in keys:
        table.pop(k, None)
    table.update(saved)
    return {**out, "glu tiles": str(pair), "glu chosen by the tuner": bool(saved)}


def normed_variants(rt: TorchCudaRuntime, batch: int, bucket: int) -> dict:
    """The decode step with the add + norm kernels, as tuned (the tuner's `normed.key` entries at
    this batch, where it kept some), and with every product after an add + norm making its input
    (the fastest such form timed for each, with its L2 prefetch where that was), side by side; the
    logits differ where a row's scale does (its sum of squares in K steps)."""
    table, fastest = rt.kernels.gemv_table, {}
    for r in rt.kernels.gemv_report:
        forms = {f: t for f, t in r["us"].items() if normed_tuning.form_of(f) is not None}
        if r["rows"] == batch and r["kind"].endswith(normed.KEY_SUFFIX) and forms:
            config, steps = normed_tuning.form_of(min(forms, key=forms.get))
            fastest[(r["kind"], batch)] = config
            fastest.update({(r["kind"] + normed.PREFETCH_SUFFIX, batch): steps} if steps else {})
    if not fastest:
        return {"norm in products": "none timed at this batch"}
    keys = {*fastest, *((k + normed.PREFETCH_SUFFIX, b) for k, b in fastest if k.endswith(normed.KEY_SUFFIX))}
    saved = {k: table.pop(k) for k in keys if k in table}

    def entries(chosen: dict):
        return lambda: ([table.pop(k, None) for k in keys], table.update(chosen))

    variants = {"add + norm kernels": entries({})}
    if saved and saved != fastest:
        variants["as tuned"] = entries(saved)
    variants["every product makes its input"] = entries(fastest)
    out = compare(rt, batch, bucket, variants, "add + norm kernels")
    for k in keys:
        table.pop(k, None)
    table.update(saved)
    return {**out, "forms making their input": {k[0]: str(t) for k, t in fastest.items()},
            "chosen by the tuner": sorted(k[0] for k in saved)}  # fmt: skip


def rope_variants(rt: TorchCudaRuntime, batch: int, bucket: int) -> dict:
    """The decode step with the rotary + KV write kernel before attention and inside it (the
    tuner's `rope_batches`) side by side; the logits differ by summation order only."""
    batches, saved = rt.kernels.rope_batches, set(rt.kernels.rope_batches)
    setting = lambda on: lambda: batches.add(batch) if on else batches.discard(batch)
    out = compare(
        rt, batch, bucket, {"rotary kernel": setting(False), "rotary in attention": setting(True)}, "rotary kernel"
    )
    batches.clear()
    batches.update(saved)
    return {**out, "rotary in attention chosen by the tuner": batch in saved}


def measure(rt: TorchCudaRuntime, batch: int, context: int, prompts: int, bandwidth: float) -> dict:
    hold_context(rt, batch, context)
    bucket = bucket_for(context + 1, rt.buckets.context)
    rows = [StepInput(batch + i, list(range(1, 129)), 0) for i in range(prompts) if batch + i < rt.max_slots]
    out = {
        "batch": batch,
        "context": context,
        "kv_read_floor_ms": round(1e3 * kv_bytes(rt, batch, context) / bandwidth, 3),
    }
    for name, fuse in VARIANTS.items():
        rt.forward.fuse_row_quantization = fuse
        out[f"decode ms, {name}"] = round(graph_ms(lambda: rt.forward.decode(batch, bucket), reps=20), 3)
        if rows:
            inputs = rt.prefill_inputs(rows, len(rows), 128)
            out[f"prefill {len(rows)}x128 ms, {name}"] = round(
                graph_ms(lambda: rt.forward.prefill(*inputs), reps=10), 3
            )
    rt.forward.fuse_row_quantization = True
    out.update(pdl_variants(rt, batch, bucket))
    out.update(gated_variants(rt, batch, bucket))
    out.update(rope_variants(rt, batch, bucket))
    out.update(glu_variants(rt, batch, bucket))
    out.update(mlp_variants(rt, batch, bucket))
    out.update(attention_o_variants(rt, batch, bucket))
    out.update(normed_variants(rt, batch, bucket))
    if rt.kernels.split_table:  # the same step with every row's keys in one program, for comparison
        splits, rt.kernels.split_table = rt.kernels.split_table, {}
        out["decode ms, unsplit keys"] = round(graph_ms(lambda: rt.forward.decode(batch, bucket), reps=20), 3)
        rt.kernels.split_table = splits
    with fused.rounding_in_two_passes():
        two_pass = graph_ms(lambda: rt.forward.decode(batch, bucket), reps=20)
    out["decode ms, activation rounded in two passes"] = round(two_pass, 3)
    out["products_floor_ms"] = round(products_floor_ms(rt, batch), 3)
    out["top_kernels"] = top_kernels(lambda: rt.forward.decode(batch, bucket), n=16)
    log.info("%s", {k: v for k, v in out.items() if k != "top_kernels"})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=list(SHAPES), default="8b")
    p.add_argument("--quantization", choices=["none", *quant.SCHEMES], default="fp8")
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto")
    p.add_argument("--quantize-lm-head", action="store_true", help="the LM head 8-bit too (the served fp8 engines')")
    p.add_argument("--batches", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--context", type=int, default=192, help="positions each row holds (128/128: 128-255)")
    p.add_argument("--max-context", type=int, default=512, help="the engine's; 1,024+ tunes split-key attention")
    p.add_argument("--prefill", type=int, default=8, help="prompts of 128 tokens in the prefill measured")
    p.add_argument("--no-pdl", action="store_true", help="every row but the PDL A/B without PDL")
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--topic", default="profile-step")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    model = CausalLM(random_model("llama", SHAPES[a.shape]))
    if a.quantization != "none":
        quant.quantize_model(model, a.quantization)
    if a.quantize_lm_head:
        quant.quantize_head(model)
    slots = max(a.batches) + a.prefill
    cfg = bench_engine_config(
        slots,
        quantization=a.quantization,
        kv_cache_dtype=a.kv_cache_dtype,
        quantize_lm_head=a.quantize_lm_head,
        max_context=a.max_context,
        max_tokens_limit=a.max_context - 1,
    )
    rt = TorchCudaRuntime(None, cfg, model=model, capture_at_start=False)
    rt.kernels.pdl = rt.kernels.pdl and not a.no_pdl
    bandwidth = copy_bandwidth()
    rows = [measure(rt, b, a.context, a.prefill, bandwidth) for b in a.batches]
    table = [{k: v for k, v in r.items() if k != "top_kernels"} for r in rows]
    facts = {
        "shape": a.shape,
        "quantization": a.quantization,
        "kv_cache_dtype": a.kv_cache_dtype,
        "quantized_lm_head": a.quantize_lm_head,
        "copy_bandwidth_gb_s": round(bandwidth / 1e9),
        "kernels": rt.kernels.describe(),
        "top_kernels": {r["batch"]: r["top_kernels"] for r in rows},
    }
    print(write_results(a.out, a.topic, facts, table))


if __name__ == "__main__":
    main()
