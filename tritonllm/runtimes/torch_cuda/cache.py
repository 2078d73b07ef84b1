"""The torch runtimes' KV cache: static, on the device, one row of `max_context` positions per
slot, and how many slots fit in the memory the configuration gives it."""

from __future__ import annotations

import logging

import torch

from ...config import EngineConfig
from ...model.shape import ModelShape

log = logging.getLogger(__name__)


class StaticKVCache:
    """[layers, slots, kv_heads, max_context, head_dim] keys and values on the device."""

    def __init__(self, shape: ModelShape, slots: int, max_context: int, dtype: torch.dtype, device):
        dims = (shape.num_layers, slots, shape.num_kv_heads, max_context, shape.head_dim)
        self.keys = torch.zeros(dims, dtype=dtype, device=device)
        self.values = torch.zeros(dims, dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    @staticmethod
    def bytes_per_slot(shape: ModelShape, max_context: int, dtype: torch.dtype) -> int:
        item = torch.empty((), dtype=dtype).element_size()
        return 2 * shape.num_layers * shape.num_kv_heads * max_context * shape.head_dim * item

    def update(self, layer: int, rows: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k/v [B,Hkv,T,D] of slots `rows` [B] at positions [B,T]."""
        r = rows[:, None].expand_as(positions)
        self.keys[layer].permute(0, 2, 1, 3)[r, positions] = k.transpose(1, 2)
        self.values[layer].permute(0, 2, 1, 3)[r, positions] = v.transpose(1, 2)


def size_slots(shape: ModelShape, cfg: EngineConfig, dtype: torch.dtype, device: torch.device) -> int:
    """Slots for the KV cache: cfg.max_slots, or fewer where `kv_cache_memory_fraction` of the
    device's free memory holds fewer (one more slot is kept as the prefill graphs' scratch)."""
    if device.type != "cuda":
        return cfg.max_slots
    free, _ = torch.cuda.mem_get_info(device)
    per_slot = StaticKVCache.bytes_per_slot(shape, cfg.max_context, dtype)
    fit = int(free * cfg.kv_cache_memory_fraction) // per_slot - 1
    if fit < 1:
        raise RuntimeError(
            f"no room for one KV slot of {cfg.max_context} tokens ({per_slot / 2**20:.0f} MiB) in "
            f"{cfg.kv_cache_memory_fraction:.0%} of {free / 2**30:.1f} GiB free: lower max_context "
            "or raise kv_cache_memory_fraction"
        )
    slots = min(cfg.max_slots, fit)
    log.info(
        "KV cache: %d slots x %d tokens (%.2f GiB); %d slots would fit",
        slots,
        cfg.max_context,
        slots * per_slot / 2**30,
        fit,
    )
    return slots
