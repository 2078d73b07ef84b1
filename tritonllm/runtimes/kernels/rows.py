"""Activations rounded to float8 per row (`QuantRows`): what a fused producer (add + norm, the gated
activation) hands a product that multiplies 8 bits by 8 bits, the FP8 GEMM (`qmatmul`) or a
small-batch tile (`gemv`). Its own module, as both product modules read it."""

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
