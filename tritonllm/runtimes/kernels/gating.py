"""Reading a matrix product's output inside the kernel that consumes it (OpenAI Triton helpers
shared by `fused` and `gemv`): a split-K product's partial sums added up as they load, and a
gated MLP's act(gate) * up made from gate_up's product as it loads, so neither needs a kernel (and
a round trip through memory) of its own."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ACTIVATIONS = ("silu", "gelu_tanh")  # the gated forms the kernels make: SwiGLU, GeGLU (tanh approximation)


@triton.jit
def load_product(ptr, offs, mask, n_split, s_split, like):
    """A matrix product's values at ptr + offs as float32: the sum of its `n_split` partial sums
    (slices `s_split` apart; 1 for a plain product), rounded to `like`'s element type first, as
    the unsplit product's output is."""
    acc = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    for s in range(1, n_split):
        acc += tl.load(ptr + s * s_split + offs, mask=mask, other=0.0).to(tl.float32)
    return acc.to(like.dtype.element_ty).to(tl.float32)


@triton.jit
def gated(gate_up, row, i, m, f, n_split, s_split, like, GELU: tl.constexpr):
    """act(gate) * up at columns i (< f) of rows `row` of gate_up's product [rows, 2F] (gate then
    up), rounded to like's type as the module rounds it."""
    g = load_product(gate_up, row * 2 * f + i, m, n_split, s_split, like)
    u = load_product(gate_up, row * 2 * f + f + i, m, n_split, s_split, like)
    return glu(g, u, like, GELU)


@triton.jit
def glu(g, u, like, GELU: tl.constexpr):
    """act(g) * u of gate and up values (float32, each already rounded to like's type), rounded
    to like's type as the module rounds it."""
    if GELU:  # the tanh approximation: 0.5 g (1 + tanh z) = g / (1 + e^-2z)
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        a = g / (1.0 + tl.exp(-2.0 * z))
    else:
        a = g / (1.0 + tl.exp(-g))
    return (a.to(like.dtype.element_ty).to(tl.float32) * u).to(like.dtype.element_ty)


def parts(y) -> tuple[torch.Tensor, int, int, torch.dtype]:
    """(values [S, rows, N], S, stride between slices, activations' type) of a plain product or a
    split one (`gemv.SplitK`: its `parts` and `dtype`)."""
    if isinstance(y, torch.Tensor):
        flat = y.reshape(1, -1, y.shape[-1])
        return flat, 1, flat.stride(0), y.dtype
    return y.parts, y.parts.shape[0], y.parts.stride(0), y.dtype


def like(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of the activations' type for a kernel's `like` argument: the values themselves where
    they are of it (a plain product), else one element (float32 partial sums)."""
    return values if values.dtype == dtype else torch.empty(1, dtype=dtype, device=values.device)


def check_activation(activation: str, where: str) -> bool:
    """True for GeGLU, False for SwiGLU; any other activation is refused with the forms there are."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"{where}: activation {activation!r} is not a kernel form; use one of {ACTIVATIONS}")
    return activation == "gelu_tanh"
