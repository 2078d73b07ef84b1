"""Host-side KV cache and step batching for the runtimes that run the exported graph (ONNX
Runtime, TensorRT): their graphs take any batch of rows, with the past keys/values as inputs."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..model.shape import ModelShape
from .base import StepInput


def step_by_kind(inputs: list[StepInput], run: Callable, logits):
    """Fill `logits` [len(inputs), vocab] (numpy or torch) with `run(rows)`'s: decode rows (one token
    each) as one batch, each prefill on its own (prompts differ in length: one batch would pad every
    prompt to the longest)."""
    decode = [i for i, x in enumerate(inputs) if len(x.tokens) == 1 and x.start > 0]
    if decode:
        logits[decode] = run([inputs[i] for i in decode])
    if len(decode) < len(inputs):
        batched = set(decode)
        for i, x in enumerate(inputs):
            if i not in batched:
                logits[i] = run([x])[0]
    return logits


def staged(buffers: tuple, dims: tuple) -> tuple[tuple, tuple]:
    """(flat buffers, views of their first prod(dims) elements shaped `dims`): the same buffers, or
    new ones where they are too small (kept by the caller for the next call)."""
    n = int(np.prod(dims))
    if buffers[0].size < n:
        buffers = tuple(np.empty(n, b.dtype) for b in buffers)
    return buffers, tuple(b[:n].reshape(dims) for b in buffers)


class KVCache:
    """Preallocated keys/values for every slot: [layers, slots, kv_heads, max_context, head_dim]."""

    def __init__(self, shape: ModelShape, slots: int, max_context: int, dtype=np.float32):
        dims = (shape.num_layers, slots, shape.num_kv_heads, max_context, shape.head_dim)
        self.keys = np.zeros(dims, dtype=dtype)
        self.values = np.zeros(dims, dtype=dtype)
        self._staging = (np.empty(0, dtype), np.empty(0, dtype))  # gather's output, grown on demand

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def gather(self, slots: list[int], length: int, out: tuple | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Past keys/values of `slots` up to `length` positions: [L, B, Hkv, length, D], copied into
        `out` or else into staging buffers kept between calls (valid until the next call): a fresh
        array each step would touch its pages anew. Staging grows to the largest batch x past seen,
        at most the cache's own size."""
        dims = (self.keys.shape[0], len(slots), self.keys.shape[2], length, self.keys.shape[4])
        if out is None:
            self._staging, out = staged(self._staging, dims)
        in_order = slots == list(range(len(slots)))  # slots 0..B-1: one strided copy each
        for src, dst in zip((self.keys, self.values), out):
            if in_order:
                np.copyto(dst, src[:, : len(slots), :, :length])
            else:
                np.take(src[:, :, :, :length], slots, axis=1, out=dst)
        return out

    def update(
        self, slots: list[int], starts: list[int], counts: list[int], new_keys: np.ndarray, new_values: np.ndarray
    ) -> None:
        """Write row b's first counts[b] new positions at starts[b].. of slots[b]."""
        for b, (slot, start, n) in enumerate(zip(slots, starts, counts)):
            self.keys[:, slot, :, start : start + n] = new_keys[:, b, :, :n]
            self.values[:, slot, :, start : start + n] = new_values[:, b, :, :n]
