"""GPTQ rounding for the 8-bit weight schemes (Frantar et al., 2022): an optional calibration pass
that keeps each projection's format and per-channel absmax scales (so the kernels do not change)
but chooses each weight's rounding so that the layer's output on calibration inputs moves least.

Column by column along K, a weight is rounded to the format's grid and its rounding error is
spread over the columns not yet rounded, weighted by the inverse of H = X^T X (X: the
projection's inputs over the calibration prompts); blocks of columns batch the updates. The
inputs come from the unquantized model in one pass (not layer by layer through the quantized
ones): simpler, and what the paper's "no sequential" ablation measures close to the full method."""

from __future__ import annotations

import torch

from .quant import PROJECTIONS, SCHEMES, quantize_weight, to_grid


def input_hessians(model, feeds: list[tuple]) -> dict[tuple[int, str], torch.Tensor]:
    """(layer, projection) -> sum of x^T x over every input row the projection saw (float64),
    running the model's forward on each feed (its positional inputs)."""
    sums: dict[tuple[int, str], torch.Tensor] = {}

    def hook(key):
        def accumulate(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[key] = sums.get(key, 0) + x.T @ x

        return accumulate

    handles = [
        getattr(layer, kind).register_forward_pre_hook(hook((i, kind)))
        for i, layer in enumerate(model.layers)
        for kind in PROJECTIONS
    ]
    try:
        with torch.no_grad():
            for feed in feeds:
                model(*feed)
    finally:
        for h in handles:
            h.remove()
    return sums


def prompt_hessians(model, prompts: list[list[int]]) -> dict[tuple[int, str], torch.Tensor]:
    """`input_hessians` over the prefill of each prompt (token ids)."""
    return input_hessians(model, [prefill_inputs(model.shape, p) for p in prompts])


def prefill_inputs(shape, ids: list[int]) -> tuple:
    """CausalLM's positional inputs for one prompt's prefill from an empty cache (float32)."""
    from .graph_io import prefill_feed

    feed = prefill_feed(ids, shape.num_layers, shape.num_kv_heads, shape.head_dim)
    return tuple(torch.from_numpy(v) for v in feed.values())


def gptq_weight(
    weight: torch.Tensor, hessian: torch.Tensor, scheme: str, block: int = 128, damp: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (q [N, K] in the scheme's dtype, scale [N]) like `quant.quantize_weight`,
    with GPTQ's rounding under `hessian` [K, K]."""
    _, scale = quantize_weight(weight, scheme)
    w = weight.detach().double() / scale.double()[:, None]  # in scale units: the grid is the format's
    h = hessian.double().clone()
    dead = torch.diag(h) == 0  # inputs that were always zero: their weights cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(len(h), dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    for i1 in range(0, w.shape[1], block):
        i2 = min(i1 + block, w.shape[1])
        part, errors = w[:, i1:i2].clone(), torch.zeros_like(w[:, i1:i2])
        for i in range(i2 - i1):
            q[:, i1 + i] = to_grid(part[:, i], *SCHEMES[scheme]).double()
            err = (part[:, i] - q[:, i1 + i]) / hinv[i1 + i, i1 + i]
            part[:, i:] -= err[:, None] * hinv[i1 + i, i1 + i : i2][None, :]
            errors[:, i] = err
        w[:, i2:] -= errors @ hinv[i1:i2, i2:]
    return q.float().to(SCHEMES[scheme][0]), scale


def output_error(weight: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, hessian: torch.Tensor) -> float:
    """sum over calibration rows of |x W^T - x Wq^T|^2, relative to sum |x W^T|^2: trace(D H D^T) / trace(W H W^T)."""
    w = weight.double()
    d = w - q.double() * scale.double()[:, None]
    h = hessian.double()
    return float(torch.einsum("nk,kl,nl->", d, h, d) / torch.einsum("nk,kl,nl->", w, h, w))
