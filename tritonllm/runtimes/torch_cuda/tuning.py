"""Start-up kernel choices of the torch runtime: whether the fused OpenAI-Triton kernels run here
(self-checked), and which tile each small-batch product and the decode attention use, chosen by
timing the candidates on this GPU against cuBLAS / the default. Every choice falls back to the
torch ops when a kernel does not compile or check out here."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...model.quant import PROJECTIONS, operands, scheme_of
from . import tuning_cache
from .cache import PagedDeviceCache

log = logging.getLogger(__name__)
PREFILL_ROWS = 2048  # a prefill's products (prompt tokens x weight) are timed at this many rows
PIECE_DEFAULT = (64, 64, 4, 3)  # kernels.attention.PIECE_CONFIGS[0] (that module needs OpenAI Triton)
ROUNDED_BY_PRODUCER = ("qkv_proj", "gate_up", "down")  # products whose input a fused kernel makes (and can
# round per row for an FP8 GEMM); the attention output that "o" reads is not
INT8_ROWS = frozenset({"lm_head"})  # int8 weights that may multiply rows rounded to int8 (int8 x int8
# tiles): the int8 LM head beside fp8 projections, whose inputs are rounded to 8 bits already (an
# int8-wo engine keeps its activations as they are: weight-only is its promise)
GATED = "down"  # the product that may make its own input from gate_up's (`gemv.Gated`) at decode rows
PREFETCH_STEPS = 0  # K steps of its weight tile a small product asks L2 for before its wait (PDL); none:
# on the H200 the prefetch made a batch-1 step slower (docs/decisions.md)


@dataclass
class KernelChoice:
    triton: bool = False  # fused Triton kernels for decode and prefill
    gemv_table: dict = field(default_factory=dict)  # {(weight kind, batch rows): tile config, or gemv.FP8_GEMM}
    attention_table: dict = field(default_factory=dict)  # {batch bucket: decode attention config}
    split_table: dict = field(default_factory=dict)  # {batch bucket: split-key config at long contexts}
    quant_table: dict = field(default_factory=dict)  # 8-bit weights, beyond gemv's rows: {(kind, rows): choice}
    piece_config: tuple = PIECE_DEFAULT  # prompt pieces' attention: (query rows a program, keys, warps, stages)
    pdl: bool = False  # the decode step's kernels launched with programmatic dependent launch (kernels/pdl.py)
    prefetch_steps: int = PREFETCH_STEPS  # ... each small product first asking L2 for this many K steps of its tile
    rope_batches: set = field(default_factory=set)  # batch buckets whose decode attention does the rotary + KV write
    gemv_report: list = field(default_factory=list)  # the timings behind the tables
    attention_report: list = field(default_factory=list)
    quant_report: list = field(default_factory=list)
    piece_report: list = field(default_factory=list)
    rope_report: list = field(default_factory=list)

    def describe(self) -> dict:
        return {
            "triton_kernels": self.triton,
            "gemv": {
                f"{kind} x{rows}": list(cfg) if isinstance(cfg, tuple) else cfg
                for (kind, rows), cfg in sorted(self.gemv_table.items())
            },
            "decode_attention": {b: list(cfg) for b, cfg in sorted(self.attention_table.items())},
            "decode_attention_long": {b: list(cfg) for b, cfg in sorted(self.split_table.items())},
            "piece_attention": list(self.piece_config),
            "pdl": self.pdl,
            "prefetch_steps": self.prefetch_steps,
            "rotary_in_attention": sorted(self.rope_batches),
            "quantized_products": {f"{kind} x{rows}": str(c) for (kind, rows), c in sorted(self.quant_table.items())},
        }


def want_triton(
    asked: bool | None,
    fused_ops: bool,
    device: torch.device,
    dtype: torch.dtype,
    head_dim: int,
    qk_norm: bool = False,
    fp8_kv: bool = False,
    fp8_rows: bool = False,
) -> bool:
    """Fused Triton kernels on CUDA where `triton` imports and their self check passes (with the
    forms an fp8 cache / fp8 weights need);
    TRITONLLM_TRITON_KERNELS=0 turns them off; `asked` forces the choice (tests, profiling)."""
    if asked is not None:
        return asked
    if not fused_ops or device.type != "cuda" or os.environ.get("TRITONLLM_TRITON_KERNELS") == "0":
        return False
    try:
        from ..kernels import fused_check

        fused_check.self_check(device, dtype, head_dim, qk_norm, fp8_kv, fp8_rows)
        return True
    except Exception as exc:  # no triton, or its kernels do not compile here: the torch ops serve
        log.warning("fused Triton decode kernels unavailable (%s): using the torch ops", str(exc)[:300])
        return False


def choose_kernels(
    model,
    cache: PagedDeviceCache,
    batch_buckets: list[int],
    max_context: int,
    triton: bool,
    gemv_table: dict | None,
    quant_table: dict | None = None,
    piece_tokens: int = 0,
    folder: Path | None = None,
    deterministic: bool = False,
) -> KernelChoice:
    """The tables for this model on this device: `gemv_table` / `quant_table` as given (tests),
    else tuned, or read from `folder` where this engine was tuned before (`tuning_cache`); the
    prompt pieces' attention tile for steps of up to `piece_tokens` (0: default). `deterministic`:
    no kernel whose sums' order varies between runs (the fused MLP's atomics) is tuned in."""
    device = cache.keys.device
    if not triton or device.type != "cuda":
        return KernelChoice(triton, dict(gemv_table or {}), quant_table=dict(quant_table or {}))
    from ..kernels import pdl

    on = pdl.supported(device)
    stages = _stages(model, cache, batch_buckets, max_context, gemv_table, quant_table, piece_tokens, deterministic)
    start = KernelChoice(True, pdl=on)
    if gemv_table is not None or quant_table is not None:  # tables given: nothing to keep
        return tuning_cache.cached(None, {}, start, stages, KernelChoice)
    fields = tuning_cache.facts(model, cache, batch_buckets, max_context, piece_tokens, on, deterministic)
    return tuning_cache.cached(folder, fields, start, stages, KernelChoice)


Stage = tuple[str, Callable[[KernelChoice], None]]


def _stages(
    model, cache, batch_buckets, max_context, gemv_table, quant_table, piece_tokens, deterministic=False
) -> list[Stage]:
    """The tuning in named steps, each filling its part of the choice: the cache stores the choice
    after each one, so a start stopped mid-tuning resumes at the step it was in. The products
    are a step per weight kind (the longest part: compiling and timing every tile); the fused
    MLP's step is left out where `deterministic`."""

    scratch: dict[bool, dict] = {}  # the products' consumers on scratch inputs, made once for every stage

    def consumers(pdl: bool) -> dict:
        if pdl not in scratch:
            scratch[pdl] = _product_consumers(model, cache, max(batch_buckets), pdl)
        return scratch[pdl]

    def products(part: str, tune, kind: str) -> Callable[[KernelChoice], None]:
        return lambda c: _merge(c, part, tune(model, consumers(c.pdl), batch_buckets, c.pdl, kind))

    def attention(c: KernelChoice) -> None:
        c.attention_table, c.attention_report = _tune_attention(model, cache, batch_buckets, max_context)

    def rope(c: KernelChoice) -> None:
        c.rope_batches, c.rope_report = _tune_rope(model, cache, c.attention_table, max_context)

    def splits(c: KernelChoice) -> None:
        c.split_table = _tune_splits(model, cache, c.attention_table, max_context)

    def pieces(c: KernelChoice) -> None:
        c.piece_config, c.piece_report = _tune_pieces(model, cache, piece_tokens, max_context)

    stages: list[Stage] = []
    if gemv_table is not None:
        stages.append(("gemv", lambda c: c.gemv_table.update(gemv_table)))
    elif os.environ.get("TRITONLLM_GEMV") != "0":
        stages += [(f"gemv {k}", products("gemv", _tune_gemv, k)) for k in (*PROJECTIONS, "lm_head")]
        stages.append(("glu", lambda c: _merge(c, "gemv", _tune_glu(model, c, batch_buckets))))
        if not deterministic:  # its atomic adds sum in the order the programs reach them
            stages.append(("mlp", lambda c: _merge(c, "gemv", _tune_mlp(model, c, batch_buckets, consumers(c.pdl)))))
    stages += [("attention", attention), ("rotary", rope)]
    if gemv_table is None and not deterministic:  # o's timings are gemv's; atomic adds as in "mlp"
        tune_o = lambda c: _tune_attention_o(model, cache, c, max_context, consumers(c.pdl)["o"])
        stages.append(("attention+o", lambda c: _merge(c, "gemv", tune_o(c))))
    if gemv_table is None and model.layers[0].post_attention is None:  # (Gemma's norms of products: kernel only)
        stages.append(("norm in products", lambda c: _merge(c, "gemv", _tune_normed(model, c, batch_buckets))))
    stages += [("splits", splits)] + ([("pieces", pieces)] if piece_tokens else [])
    if quant_table is not None:
        stages.append(("quant", lambda c: c.quant_table.update(quant_table)))
    elif scheme_of(model) != "none":
        stages += [(f"quant {k}", products("quant", _tune_quant, k)) for k in _quant_kinds(model)]
    return stages


def _merge(choice: KernelChoice, part: str, tuned: tuple[dict, list]) -> None:
    """Adds one weight kind's table entries and timings to the choice's `part` ("gemv" / "quant")."""
    table, report = tuned
    getattr(choice, f"{part}_table").update(table)
    getattr(choice, f"{part}_report").extend(report)


def _tune_gemv(model, consumers: dict, batch_buckets: list[int], pdl: bool, kind: str) -> tuple[dict, list]:
    """{(kind, batch rows): tile} for one weight kind's small-batch products in the decode step,
    each timed with the fused kernel that reads its product (split-K partial sums are added up
    there), launched with PDL where the step launches them so; the down product also on gate_up's
    product through the activation (`gemv.Gated`, under `gemv.gated_key("down")`)."""
    try:
        from ..kernels import gating, gemv_tuning

        rounded = frozenset(ROUNDED_BY_PRODUCER)
        weights = {kind: _weights(model, kind)}
        gates = kind == GATED and model.features.activation in gating.ACTIVATIONS
        gated = {kind: _gated_kind(model, pdl)} if gates else {}
        return gemv_tuning.tune(
            weights, batch_buckets, consumers, dtype=model.embed.dtype, pdl=pdl, rounded=rounded, gated=gated
        )
    except Exception as exc:  # the tiles do not compile here: cuBLAS serves these products
        log.warning("gemv tuning of %s failed (%s): cuBLAS serves its decode products", kind, str(exc)[:300])
        return {}, []


def _tune_glu(model, c: KernelChoice, batch_buckets: list[int]) -> tuple[dict, list]:
    """The decode batches where gate_up's tile makes the activation itself and a down tile takes
    it as it is (`gemv_tuning.tune_glu`, from the gate_up and down timings already in `c`)."""
    from ..kernels import gating, gemv_tuning

    activation = model.features.activation
    if activation not in gating.ACTIVATIONS:
        return {}, []
    try:
        mats, steps, dtype = _weights(model, "gate_up"), 0 if c.pdl else None, model.embed.dtype
        return gemv_tuning.tune_glu(mats, c.gemv_report, c.gemv_table, batch_buckets, activation, dtype, steps)
    except Exception as exc:  # the form does not compile here: gate_up + the activation kernel serve
        log.warning("gate_up making the activation: tuning failed (%s); the activation kernel serves", str(exc)[:300])
        return {}, []


def _tune_mlp(model, c: KernelChoice, batch_buckets: list[int], consumers: dict) -> tuple[dict, list]:
    """The decode batches where one kernel makes the whole gated MLP (`mlp.tune`, against the
    timings already in `c`); not for MLPs with biases (the kernel has none)."""
    from ..kernels import gating, mlp

    activation, gate_up, down = model.features.activation, _weights(model, "gate_up"), _weights(model, "down")
    if activation not in gating.ACTIVATIONS or any(b is not None for _, b, _ in gate_up + down):
        return {}, []
    layers = [((w, s), (wd, sd)) for (w, _, s), (wd, _, sd) in zip(gate_up, down)]
    try:
        dtype, consume = model.embed.dtype, consumers["down"]
        return mlp.tune(layers, c.gemv_report, c.gemv_table, batch_buckets, activation, dtype, consume, c.pdl)
    except Exception as exc:  # the kernel does not compile here: the MLP stays as tuned
        log.warning("fused MLP: tuning failed (%s); the MLP stays as tuned", str(exc)[:300])
        return {}, []


def _tune_normed(model, c: KernelChoice, batch_buckets: list[int]) -> tuple[dict, list]:
    """The decode batches where the products after an add + norm (qkv, gate_up or its
    activation-making tile, the LM head) make their input themselves (`normed_tuning.tune`, against
    the add + norm kernel + the tiles already in `c`)."""
    from ..kernels import gemv, normed_tuning

    gate_up, activation = _weights(model, "gate_up"), model.features.activation
    readers = {"qkv_proj": (_weights(model, "qkv_proj"), None), "lm_head": (_weights(model, "lm_head"), None)}
    readers |= {"gate_up": (gate_up, None), gemv.GLU_KEYS[0]: (gate_up, activation)}
    try:
        return normed_tuning.tune(readers, c.gemv_report, c.gemv_table, batch_buckets, model.embed.dtype, c.pdl)
    except Exception as exc:  # the form does not compile here: the add + norm kernel serves
        log.warning("products making their input: tuning failed (%s); the add + norm kernel serves", str(exc)[:300])
        return {}, []


def _gated_kind(model, pdl: bool):
    """The down product's input as the decode step makes it: the activation kernel on gate_up's
    product, rounding per row to the weight's float8 for a product that takes it so."""
    from ..kernels import fused as fk
    from ..kernels import gemv_tuning
    from ..kernels.rows import float8_of

    activation, fmt = model.features.activation, float8_of(operands(model.layers[0].down)[0])
    return gemv_tuning.GatedKind(
        activation, lambda y, rounded: fk.activate_mul(y, activation, fmt if rounded else None, pdl)
    )


def _weights(model, kind: str) -> list[tuple]:
    """(weight as stored, bias, scale or None) of every layer's `kind` projection, or the LM
    head's: what tuning times."""
    if kind == "lm_head":
        head, scale = model.head()
        return [(head, None, scale)]
    return [operands(getattr(layer, kind)) for layer in model.layers]


def _quant_kinds(model) -> list[str]:
    """The 8-bit products: every projection, and the LM head where it is 8-bit too."""
    return [*PROJECTIONS, "lm_head"] if model.head()[1] is not None else list(PROJECTIONS)


def _tune_quant(model, consumers: dict, batch_buckets: list[int], pdl: bool, kind: str) -> tuple[dict, list]:
    """{(kind, rows): choice} for one 8-bit weight kind at the rows gemv does not serve: decode
    batches beyond its tiles, each product timed with the fused kernel that reads it (launched
    with PDL where the step launches it so), and a prefill's many rows (an LM head's rows are
    the batch's; a prefill's, its prompts')."""
    from ..kernels import gemv, qmatmul

    rows = [b for b in batch_buckets if b > gemv.MAX_DOT_ROWS] + [PREFILL_ROWS]
    try:
        rounded = frozenset(ROUNDED_BY_PRODUCER)
        weights = {kind: _weights(model, kind)}
        int8_rows = INT8_ROWS if scheme_of(model) == "fp8" else frozenset()
        return qmatmul.tune(weights, rows, model.embed.dtype, consumers, max(batch_buckets), rounded, int8_rows)
    except Exception as exc:  # no kernel builds here: the dequantized reference serves (slowly)
        log.warning("quantized product tuning of %s failed (%s): dequantize + cuBLAS", kind, str(exc)[:300])
        return {}, []


def _product_consumers(model, cache: PagedDeviceCache, max_rows: int, pdl: bool = False) -> dict:
    """{weight kind: the fused kernel that reads its product in the decode step}, on scratch
    inputs. Writes K/V at position 0 of the first slots, whose tables point at the scratch block."""
    from ..kernels import fused as fk

    sh, device, dtype = model.shape, cache.keys.device, model.embed.dtype
    zeros = lambda *dims: torch.zeros(*dims, device=device, dtype=dtype)
    cos, sin = zeros(max_rows, 1, sh.head_dim) + 1, zeros(max_rows, 1, sh.head_dim)
    positions = torch.zeros(max_rows, dtype=torch.long, device=device)
    residual, norm = zeros(max_rows, 1, sh.hidden_size), zeros(sh.hidden_size)
    rows = lambda y: y.parts.shape[1] if hasattr(y, "parts") else y.shape[0]
    return {
        "qkv_proj": lambda y: fk.rope_kv_write(
            y,
            cos[: rows(y)],
            sin[: rows(y)],
            cache.keys[0],
            cache.values[0],
            cache.table,
            positions[: rows(y)],
            sh.num_heads,
            sh.num_kv_heads,
            qk_norm=(norm[: sh.head_dim], norm[: sh.head_dim], 1e-6, False) if model.features.qk_norm else None,
            kv_scale=cache.layer_scales(0),
            pdl=pdl,
        ),
        "o": lambda y: fk.add_rms_norm(y, residual[: rows(y)], norm, 1e-5, pdl=pdl),
        "down": lambda y: fk.add_rms_norm(y, residual[: rows(y)], norm, 1e-5, pdl=pdl),
        "gate_up": lambda y: fk.activate_mul(y, model.features.activation, pdl=pdl),
    }


def _tune_attention(model, cache: PagedDeviceCache, batch_buckets: list[int], max_context: int) -> tuple[dict, list]:
    """{batch bucket: decode attention config}, timed at up to 256 keys per row."""
    from ..kernels import attention_tuning

    try:
        scales = [cache.layer_scales(i) for i in range(model.shape.num_layers)] if cache.fp8 else None
        table, report = attention_tuning.tune_attention(
            cache.keys, cache.values, model.shape.num_heads, batch_buckets, min(256, max_context), cache.dtype, scales
        )
    except Exception as exc:  # a config does not compile here: the default (self-checked) serves
        log.warning("decode attention tuning failed (%s): default blocks", str(exc)[:300])
        return {}, []
    log.info("decode attention configs by batch: %s", table)
    return table, report


def _tune_rope(model, cache: PagedDeviceCache, table: dict, max_context: int) -> tuple[set, list]:
    """The batch buckets where the decode step's rotary and KV write run inside its attention
    kernel (`kernels/rope_attention.py`), timed against the two kernels at up to 256 keys per row
    with each batch's attention config (none for q/k-normed models, which keep the two kernels)."""
    from ..kernels import rope_attention

    if model.features.qk_norm or not table:
        return set(), []
    try:
        scales = [cache.layer_scales(i) for i in range(model.shape.num_layers)] if cache.fp8 else None
        context = min(256, max_context)
        chosen, report = rope_attention.tune(
            cache.keys, cache.values, model.shape.num_heads, table, context, cache.dtype, scales
        )
    except Exception as exc:  # the fused kernel does not compile here: the two kernels serve
        log.warning("rotary-in-attention tuning failed (%s): the rotary kernel serves", str(exc)[:300])
        return set(), []
    log.info("rotary inside decode attention at batches %s; timings %s", sorted(chosen), report)
    return chosen, report


def _tune_attention_o(model, cache: PagedDeviceCache, c: KernelChoice, max_context: int, consume) -> tuple:
    """The decode batches whose attention (with the rotary inside) also makes the o product
    (`attention_o.tune`, against the rotary stage's and o's timings already in `c`, each followed
    by `consume`, the add + norm after o); not for o with a bias (the kernel has none). Rotary
    batches exist only for models without q/k norms."""
    from ..kernels import attention_o
    from ..kernels.attention_tuning import layer_caches

    o = _weights(model, "o")
    if not c.rope_batches or any(b is not None for _, b, _ in o):
        return {}, []
    rope_us = {r["batch"]: r["us"]["rotary in attention"] for r in c.rope_report}
    o_us = {r["rows"]: min(r["us"].values()) for r in c.gemv_report if r["kind"] == "o"}
    sh, dtype = model.shape, model.embed.dtype
    try:
        scales = [cache.layer_scales(i) for i in range(sh.num_layers)] if cache.fp8 else None
        caches, layers = layer_caches(cache.keys, cache.values, scales), [(w, s) for w, _, s in o]
        batches, context = sorted(c.rope_batches), min(256, max_context)
        return attention_o.tune(
            caches, sh.num_heads, layers, c.attention_table, batches, rope_us, o_us, context, dtype, consume, c.pdl
        )
    except Exception as exc:  # the kernel does not compile here: attention and o stay as tuned
        log.warning("attention + o: tuning failed (%s); attention and o stay as tuned", str(exc)[:300])
        return {}, []


def _tune_splits(model, cache: PagedDeviceCache, table: dict, max_context: int) -> dict:
    """{batch bucket: split-key config} for graphs of LONG_CONTEXT keys or more, timed at up to
    2,048 keys a row (none where max_context is shorter or tuning failed)."""
    from ..kernels import attention as ak
    from ..kernels import attention_tuning

    if max_context < ak.LONG_CONTEXT or not table:
        return {}
    try:
        scales = [cache.layer_scales(i) for i in range(model.shape.num_layers)] if cache.fp8 else None
        splits, report = attention_tuning.tune_splits(
            cache.keys, cache.values, model.shape.num_heads, table, min(2048, max_context), cache.dtype, scales
        )
    except Exception as exc:  # a split config does not compile here: unsplit configs serve long contexts too
        log.warning("split-key attention tuning failed (%s): unsplit blocks", str(exc)[:300])
        return {}
    log.info("decode attention split-key configs by batch (long contexts): %s; timings %s", splits, report)
    return splits


def piece_shapes(piece_tokens: int, max_context: int) -> list[tuple[int, int, int]]:
    """The prompt-piece steps the tile is chosen on, (pieces, tokens each, cached positions before
    them): many short pieces after a long cached past (a burst of prompts with a shared system
    prompt), and one long piece after a cached one (chunked prefill of a long prompt)."""
    short, long = min(64, piece_tokens), min(512, piece_tokens)
    return [
        (max(1, piece_tokens // short), short, max(0, min(1024, max_context - short - 1))),
        (1, long, max(0, min(512, max_context - long - 1))),
    ]


def _tune_pieces(model, cache: PagedDeviceCache, piece_tokens: int, max_context: int) -> tuple[tuple, list]:
    """The prompt pieces' attention tile (`attention_tuning.tune_pieces`), default where tuning fails."""
    from ..kernels import attention_tuning

    sh = model.shape
    try:
        scales = [cache.layer_scales(i) for i in range(sh.num_layers)] if cache.fp8 else None
        shapes = piece_shapes(piece_tokens, max_context)
        config, report = attention_tuning.tune_pieces(
            cache.keys, cache.values, sh.num_heads, shapes, cache.dtype, scales
        )
    except Exception as exc:  # a config does not compile here: the default (self-checked) serves
        log.warning("prompt piece attention tuning failed (%s): default tile", str(exc)[:300])
        return PIECE_DEFAULT, []
    log.info("prompt piece attention config: %s", config)
    return config, report
