"""The torch-cuda cache's block layout, shared by the runtime's cache and the kernels' tuning pools;
no OpenAI Triton here, so the cache imports it on any host. Keys are [blocks, Hkv, PAGE, D]; values
have that shape too, stored as [blocks, Hkv, D, PAGE] (`value_pool`): the P.V product reduces over
keys, and its Tensor Core operand takes 8-bit values only keys-contiguous without moving single
bytes (the keys' product reduces over D, which their own layout holds contiguous)."""

from __future__ import annotations

import torch


def value_pool(dims: tuple, dtype: torch.dtype, device) -> torch.Tensor:
    """Zeroed values [..., PAGE, D] (`dims`) stored as [..., D, PAGE] (the returned tensor a
    transposed view): each block's D rows of PAGE keys, what the attention kernels read fastest
    (`_value_tile`); indexing and the torch ops see the usual shape."""
    return torch.zeros((*dims[:-2], dims[-1], dims[-2]), dtype=dtype, device=device).transpose(-1, -2)


def as_values(x: torch.Tensor) -> torch.Tensor:
    """A copy of values x [..., PAGE, D] laid out as `value_pool` lays them out."""
    return value_pool(x.shape, x.dtype, x.device).copy_(x)


def read_pages(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """The positions that blocks [B, n] (a table's rows) hold in one layer's cache [blocks, Hkv, PAGE,
    D], in order: [B, Hkv, n * PAGE, D] (a copy)."""
    x = cache[blocks.long()]  # [B, n, Hkv, PAGE, D]
    b, n, h, page, d = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b, h, n * page, d)
