"""Products' inputs as their producers hand them over: activations rounded to float8 per row
(`QuantRows`), what a fused producer (add + norm, the gated activation) hands a product that
multiplies 8 bits by 8 bits, the FP8 GEMM (`qmatmul`) or a small-batch tile (`gemv`); and the
residual add + norm a small-batch tile makes itself (`Normed`, `normed.py`'s kernels). Their own
module, free of OpenAI Triton: the product modules and the runtime's forward read them."""

from __future__ import annotations

from typing import NamedTuple

import torch

FP8_ALIGN = 16  # the FP8 GEMM's row count must be a multiple of this


class QuantRows(NamedTuple):
    """Activations rounded to e4m3 with one scale per row, by the kernel that made them: `q`
    [rows rounded up to FP8_ALIGN, K] and `scale` [same, 1] (float32) (rows past the real ones are
    never read back); `shape` and `dtype`: the activations' own ([..., K]), which the product's
    output takes."""

    q: torch.Tensor
    scale: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype

    @staticmethod
    def empty(shape: torch.Size, dtype: torch.dtype, fmt: torch.dtype, device) -> QuantRows:
        """Room for activations of `shape` / `dtype` rounded to `fmt`."""
        rows = shape.numel() // shape[-1]
        padded = rows + (-rows % FP8_ALIGN)
        q = torch.empty((padded, shape[-1]), dtype=fmt, device=device)
        return QuantRows(q, torch.empty((padded, 1), dtype=torch.float32, device=device), shape, dtype)

    @property
    def rows(self) -> int:
        return self.shape.numel() // self.shape[-1]


def float8_of(weight: torch.Tensor) -> torch.dtype | None:
    """The type a product of `weight` may take its input rows rounded to by their producer: the
    weight's own float8 (e4m3), else None (int8 and unquantized weights take them as they are)."""
    return weight.dtype if weight.dtype == torch.float8_e4m3fn else None


class Normed(NamedTuple):
    """RMSNorm(residual + delta) * weight as a product's input, made by the product: `delta` the
    product added to the residual stream (a tensor, split partial sums, or `Accumulated` sums; None:
    the stream's norm alone), `residual` [..., K] the stream as it stands, `out` where the product's
    first program writes residual + delta (another buffer, unused where delta is None), `weight` [K]
    the norm's scale, `clear` float32 sums the product's programs zero (None: none), `prefetch`
    K steps of weight the product's programs ask L2 for before their prologue (launched with PDL)."""

    delta: object
    residual: torch.Tensor
    out: torch.Tensor
    weight: torch.Tensor
    eps: float
    clear: torch.Tensor | None = None
    prefetch: int = 0  # K steps of its weight tile each program asks L2 for once the PDL wait is over

    def checked(self) -> Normed:
        """Itself, where the kernel can read it: contiguous rows of one width, `out` apart from
        `residual`; else a ValueError naming what differs."""
        k = self.residual.shape[-1]
        if not self.residual.is_contiguous() or self.weight.shape != (k,):
            shape = tuple(self.residual.shape)
            raise ValueError(f"Normed: residual {shape} must be contiguous with a norm weight of {k}")
        if self.delta is not None:
            if self.out.shape != self.residual.shape or self.out.dtype != self.residual.dtype:
                raise ValueError(f"Normed: out {tuple(self.out.shape)} must be a second {tuple(self.residual.shape)}")
            if self.out.data_ptr() == self.residual.data_ptr():
                raise ValueError("Normed: out is the residual itself, which the programs read: pass another buffer")
            values = self.delta if isinstance(self.delta, torch.Tensor) else self.delta.parts
            if not values.is_contiguous() or values.shape[-1] != k:
                raise ValueError(f"Normed: the added product {tuple(values.shape)} must be contiguous rows of {k}")
        if self.clear is not None and (self.clear.dtype != torch.float32 or not self.clear.is_contiguous()):
            raise ValueError(f"Normed: clear must be contiguous float32 sums, got {self.clear.dtype}")
        return self
