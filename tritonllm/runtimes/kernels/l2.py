"""A product's weight bytes asked into L2 ahead of the product. At a few rows a decode step's
products stream their weights at close to the copy bandwidth, but between them run kernels that
read next to nothing from memory (rotary + cache write and attention over a short context, add +
norm, the gated activation): the memory bus idles through them. One tiny kernel, launched on a
side stream where such a stretch begins, asks L2 for the next product's weight with Hopper's bulk
prefetch (`cp.async.bulk.prefetch.L2`, one instruction per CHUNK bytes, nothing waited for), so
the product finds its first bytes, or all of them, in L2. Hopper (compute capability 9.0+) only;
Triton's interpreter cannot run it."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

CHUNK = 4096  # bytes one bulk prefetch asks for (a multiple of 16, as the instruction needs)
CHUNKS = 64  # prefetches a program issues, one a thread


def supported(device: torch.device) -> bool:
    """Bulk L2 prefetch on this device: CUDA compute capability 9.0+, not the interpreter."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


@triton.jit
def _bulk_prefetch_kernel(ptr, nbytes, CHUNK: tl.constexpr, CHUNKS: tl.constexpr):
    """Ask L2 for bytes [0, nbytes) of `ptr` (nbytes a multiple of 16), CHUNK bytes a thread;
    a chunk past the end asks for the first 16 bytes instead (already asked for: harmless)."""
    start = (tl.program_id(0) * CHUNKS + tl.arange(0, CHUNKS)).to(tl.int64) * CHUNK
    ok = start < nbytes
    size = tl.where(ok, tl.minimum(nbytes - start, CHUNK), 16).to(tl.int32)
    tl.inline_asm_elementwise(
        "cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0;",
        "=r,l,r",
        [ptr + tl.where(ok, start, 0), size],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


def span(weight: torch.Tensor, limit: int | None = None) -> int:
    """The bytes of `weight` a prefetch asks for: its first `limit` bytes (all where None), rounded
    down to 16."""
    total = weight.numel() * weight.element_size()
    return min(total, total if limit is None else limit) // 16 * 16


def prefetch(weight: torch.Tensor, limit: int | None = None) -> None:
    """Ask L2 for the first `limit` bytes of a contiguous `weight` (all of it where None) on the
    current stream; returns as soon as the requests are issued, not when the bytes arrive."""
    if not weight.is_contiguous():
        raise ValueError(f"prefetch reads a weight as stored: got a non-contiguous {tuple(weight.shape)} tensor")
    nbytes = span(weight, limit)
    if nbytes:
        grid = (triton.cdiv(nbytes, CHUNK * CHUNKS),)
        _bulk_prefetch_kernel[grid](
            weight.reshape(-1).view(torch.uint8), nbytes, CHUNK=CHUNK, CHUNKS=CHUNKS, num_warps=2
        )
