"""Residual add + RMSNorm of activation rows (OpenAI Triton helpers): the body of
`fused.add_rms_norm`'s kernel, and the same work done at the end of the matrix product whose
output it adds (`NormAfter`, `after_product`).

A decode step at a few rows runs each layer's o and down products, then an add + norm kernel over
a row or a few: two launches a layer whose only job is a couple of microseconds of work on a
few kilobytes. With `after_product` every program of the product counts itself done on a counter
(after a barrier, so its warps' stores precede the count, and with acquire-release semantics, so
the count publishes them); the program that finishes last reads the whole product back from L2
and makes the add + norm of every row, then sets the counter back to 0 for the next launch (the
next kernel waits for this whole grid, PDL or not, so it never sees a count in flight). The
serial tail is one program's: it pays only where the rows are few, which the tuner decides
(`tune`)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import gating
from .rows import QuantRows

NORM_AFTER_ROWS = 16  # rows up to which the tuner tries `after_product`: one program makes every row's
# add + norm alone, a tail that grows with the rows while the kernel it replaces has a program a row


class NormAfter(NamedTuple):
    """What `fused.add_rms_norm` is given besides the product: the residual stream (updated in
    place), the norm's weight (scales applied in fp32), eps, Gemma's norm of the product before
    it is added (`pre_weight`, or None), e4m3 where the result is rounded per row (`quantize`),
    and `counter` (int32 [1], zero between launches) that `after_product` counts programs on."""

    residual: torch.Tensor
    weight: torch.Tensor
    eps: float
    pre_weight: torch.Tensor | None
    quantize: torch.dtype | None
    counter: torch.Tensor


def norm_output(shape: torch.Size, dtype: torch.dtype, device, quantize: torch.dtype | None):
    """(the result of an add + norm or an activation: activations, or QuantRows where
    `quantize`; the kernel's store arguments (out, scale_out, qmax))."""
    if quantize is None:
        out = torch.empty(shape, dtype=dtype, device=device)
        return out, (out, out, torch.finfo(torch.float8_e4m3fn).max)
    rows = QuantRows.empty(shape, dtype, quantize, device)
    return rows, (rows.q, rows.scale, torch.finfo(quantize).max)


@triton.jit
def store_rows(out, scale_out, row, i, m, y, s_out, QUANT: tl.constexpr, QMAX: tl.constexpr):
    """Stores a row of activations `y` (already in their type): as they are, or with QUANT divided
    by the row's absmax / QMAX and rounded to out's 8-bit type (qmatmul.quantize_rows' values)."""
    if QUANT:
        v = y.to(tl.float32)
        step = tl.maximum(tl.max(tl.abs(v), axis=0), 1e-12) / QMAX
        tl.store(scale_out + row, step)
        v = tl.minimum(tl.maximum(v / step, -QMAX), QMAX)
        tl.store(out + row * s_out + i, v.to(out.dtype.element_ty, fp_downcast_rounding="rtne"), mask=m)
    else:
        tl.store(out + row * s_out + i, y, mask=m)


@triton.jit
def add_norm_row(
    x, residual, weight, pre_weight, out, scale_out, row, n, eps, n_split, s_split,
    BLOCK: tl.constexpr, PRE: tl.constexpr, QUANT: tl.constexpr, QMAX: tl.constexpr,
):  # fmt: skip
    """residual[row] += x[row] (a product: `n_split` partial sums), or += RMSNorm(x[row]) *
    pre_weight where PRE; stores RMSNorm(residual[row]) * weight to out (`store_rows`)."""
    i = tl.arange(0, BLOCK)
    m = i < n
    y = gating.load_product(x, row * n + i, m, n_split, s_split, residual)
    if PRE:  # the product RMS-normed before it is added, rounded as the module rounds it
        y = y / tl.sqrt(tl.sum(y * y, axis=0) / n + eps) * tl.load(pre_weight + i, mask=m, other=0.0).to(tl.float32)
        y = y.to(residual.dtype.element_ty).to(tl.float32)
    s = y + tl.load(residual + row * n + i, mask=m, other=0.0).to(tl.float32)
    s_stored = s.to(residual.dtype.element_ty)
    tl.store(residual + row * n + i, s_stored, mask=m)
    s = s_stored.to(tl.float32)  # normalise what the residual stream holds
    inv = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / n + eps)
    w = tl.load(weight + i, mask=m, other=0.0).to(tl.float32)
    store_rows(out, scale_out, row, i, m, (s * inv * w).to(residual.dtype.element_ty), n, QUANT, QMAX)


@triton.jit
def after_product(
    counter, x, residual, weight, pre_weight, out, scale_out, rows, n, eps, n_split, s_split,
    BLOCK: tl.constexpr, PRE: tl.constexpr, QUANT: tl.constexpr, QMAX: tl.constexpr,
):  # fmt: skip
    """Called by every program of a product kernel (grid of 2 axes) after its last store of x:
    the last one to get here makes `add_norm_row` of each of the `rows` rows."""
    tl.debug_barrier()  # every warp's stores of this program before its count
    done = tl.atomic_add(counter, 1, sem="acq_rel")
    if done == tl.num_programs(0) * tl.num_programs(1) - 1:
        for row in range(rows):
            add_norm_row(
                x, residual, weight, pre_weight, out, scale_out, row, n, eps, n_split, s_split, BLOCK, PRE, QUANT, QMAX
            )
        tl.store(counter, 0)


def norm_args(then: NormAfter, like: torch.Tensor) -> tuple[torch.Tensor | QuantRows, dict]:
    """(the add + norm's result, `after_product`'s arguments other than the product's own)."""
    result, (out, scale_out, qmax) = norm_output(then.residual.shape, then.residual.dtype, like.device, then.quantize)
    pre = then.pre_weight if then.pre_weight is not None else then.weight
    args = dict(
        counter=then.counter,
        residual=then.residual,
        norm_weight=then.weight,
        pre_weight=pre,
        norm_out=out,
        scale_out=scale_out,
        eps=then.eps,
        NORM=True,
        NORM_BLOCK=triton.next_power_of_2(then.residual.shape[-1]),
        PRE=then.pre_weight is not None,
        QUANT=then.quantize is not None,
        QMAX=qmax,
    )
    return result, args


def tune(products: dict, configs: dict, rounds: dict, dtype: torch.dtype, pdl_steps: int | None) -> tuple[set, list]:
    """The batches where the o and down products make the add + norm after them (`after_product`)
    faster than the add + norm kernel after each: `products` {"o" / "down": every layer's (weight,
    bias, scale)}, `configs` {batch: {kind: its decode tile}}, `rounds` {batch: {kind: what the
    norm after it rounds to, or None}}; both forms timed over every layer as a decode step runs
    them (CUDA graph replays, launched with PDL where `pdl_steps` is not None), and the fused one
    kept only where it also agrees with the kernel on layer 0. Returns (those batches, timings)."""
    from .fused import add_rms_norm
    from .gemv import small_matmul
    from .timing import agrees, graph_ms

    weight = products["o"][0][0]
    hidden, device = weight.shape[0], weight.device
    counter, norm_w = torch.zeros(1, dtype=torch.int32, device=device), torch.rand(hidden, device=device) + 0.5
    chosen, report = set(), []
    for b, kinds in sorted(configs.items()):
        x = {k: _product_input(b, products[k][0][0], kinds[k], dtype) for k in kinds}

        def step(fused: bool, residual: torch.Tensor, layers: int = len(products["o"])) -> list:
            out = []
            for i in range(layers):
                for kind in ("o", "down"):
                    w, bias, scale = products[kind][i]
                    then = NormAfter(residual, norm_w, 1e-5, None, rounds[b][kind], counter)
                    y = small_matmul(x[kind], w, bias, kinds[kind], scale, pdl_steps, then if fused else None)
                    out.append(
                        y
                        if fused
                        else add_rms_norm(y, residual, norm_w, 1e-5, None, then.quantize, pdl_steps is not None)
                    )
            return out

        residual = torch.randn(b, 1, hidden, device=device, dtype=dtype)
        ref = _values(step(False, residual.clone(), 1)[-1])
        if not agrees(
            f"add + norm in the products at {b} rows", lambda: _values(step(True, residual.clone(), 1)[-1]), ref
        ):
            continue
        times = {
            name: graph_ms(lambda f=f: step(f, residual)) for name, f in (("norm kernel", False), ("in products", True))
        }
        if times["in products"] < times["norm kernel"]:
            chosen.add(b)
        report.append({"batch": b, "us": {n: round(1e3 * t, 1) for n, t in times.items()}})
    return chosen, report


def _product_input(rows: int, weight: torch.Tensor, config: tuple, dtype: torch.dtype):
    """Random input rows for a product of `weight` by `config`: rounded per row where it takes them so."""
    from .gemv import takes_rounded
    from .qmatmul import round_rows

    x = torch.randn(rows, 1, weight.shape[1], device=weight.device, dtype=dtype)
    return round_rows(x, weight.dtype) if takes_rounded(config) else x


def _values(y) -> torch.Tensor:
    """An add + norm's result as float32 rows (rounded rows times their scales)."""
    if isinstance(y, QuantRows):
        return (y.q[: y.rows].float() * y.scale[: y.rows]).view(y.shape)
    return y.float()
