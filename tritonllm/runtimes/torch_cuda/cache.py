"""The torch runtimes' KV cache: paged, on the device. Keys/values live in blocks of BLOCK_SIZE
positions from one pool sized by `kv_cache_memory_fraction` of free memory; `BlockTables` (shared
with the host runtimes) keeps each slot's blocks, the prefix cache and admission's promises, and
a device mirror of the tables lets the kernels (and CUDA graphs) find a position's block there.
Every table entry without a block points at one scratch block: the writes of a graph's padding
rows and of positions past a sequence's promise land there, never in another sequence's block.

With `kv_cache_dtype` fp8 the blocks hold e4m3 keys/values, each divided by a scale per layer and KV
head (`scales` [layers, 2, Hkv]: keys', values') and saturated at +-448; the readers multiply it
back. The scales come from `measure_kv_scales`: FP8_HEADROOM times the largest key/value each head
showed over random tokens, over 448. e4m3 is floating point (3 mantissa bits at every magnitude),
so the headroom costs precision only for values that many times smaller than the largest (then
below e4m3's smallest normal), which weigh nothing in attention."""

from __future__ import annotations

import logging

import torch

from ...config import EngineConfig
from ...model.shape import ModelShape
from ..kernels.pages import read_pages, value_pool
from ..paged_kv import BLOCK_SIZE, BlockTables, blocks_for
from .transfers import PinnedRing, copy_to

log = logging.getLogger(__name__)
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
FP8_HEADROOM = 4.0  # keys/values of real text may exceed those of random tokens


class PagedDeviceCache:
    """keys/values [layers, blocks + 1, kv_heads, BLOCK_SIZE, head_dim] (block `scratch` = the last;
    the values stored with each block's head_dim rows of BLOCK_SIZE positions, `value_pool`) and
    `table` [slots, blocks per max_context] (int32) on the device."""

    def __init__(
        self,
        shape: ModelShape,
        num_blocks: int,
        slots: int,
        max_context: int,
        dtype: torch.dtype,
        device,
        prefix_cache: bool = True,
        scales: torch.Tensor | None = None,
    ):
        """`dtype`: the activations'; `scales` [layers, 2, Hkv] (float32): store fp8 keys/values."""
        dims = (shape.num_layers, num_blocks + 1, shape.num_kv_heads, BLOCK_SIZE, shape.head_dim)
        self.dtype, self.fp8 = dtype, scales is not None
        self.keys = torch.zeros(dims, dtype=FP8 if self.fp8 else dtype, device=device)
        self.values = value_pool(dims, FP8 if self.fp8 else dtype, device)  # [D, PAGE] a block: see value_pool
        self.scales = scales.to(device=device, dtype=torch.float32).contiguous() if self.fp8 else None
        self.scratch = self.num_blocks = num_blocks
        self.blocks = BlockTables(num_blocks, slots, prefix_cache)
        self.block_size, self.width = BLOCK_SIZE, blocks_for(max_context)
        self.table = torch.full((slots, self.width), num_blocks, dtype=torch.int32, device=device)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    @staticmethod
    def bytes_per_block(shape: ModelShape, dtype: torch.dtype) -> int:
        item = torch.empty((), dtype=dtype).element_size()
        return 2 * shape.num_layers * shape.num_kv_heads * BLOCK_SIZE * shape.head_dim * item

    def sync(self, ring: PinnedRing | None = None) -> None:
        """Mirror the table entries changed since the last call on the device: one upload of
        (entry, block) pairs and one scatter, queued on the stream before the step that reads them
        (a step still in flight reads the old entries, as it should)."""
        dirty = self.blocks.take_dirty()
        if not dirty:
            return
        at, blocks = [], []
        for slot, (first, end) in dirty.items():  # entries past a table's end point at the scratch block
            table, base = self.blocks.tables[slot], slot * self.width
            stop = max(end, len(table))
            at.extend(range(base + first, base + stop))
            blocks.extend(table[first:stop])
            blocks.extend([self.scratch] * (stop - max(first, len(table))))
        staged = torch.empty(2 * len(at), dtype=torch.long, device=self.table.device)
        copy_to(staged, at + blocks, ring)
        self.table.view(-1)[staged[: len(at)]] = staged[len(at) :].to(torch.int32)

    def update(self, layer: int, rows: torch.Tensor, positions: torch.Tensor, k, v, real=None) -> None:
        """Write k/v [B,Hkv,T,D] of slots `rows` [B] at positions [B,T] (only where `real` [B,T] is
        True, if given: a batch of ragged pieces, whose padding may lie past a table's end)."""
        index = positions // self.block_size
        if real is not None:  # padding goes to the scratch block (no boolean indexing: it would wait for the device)
            index = index.clamp(max=self.width - 1)
        block = self.table[rows[:, None], index].long()
        if real is not None:
            block = torch.where(real, block, self.scratch)
        offset = positions % self.block_size
        self.keys[layer][block, :, offset] = self._stored(k, layer, 0).transpose(1, 2)
        self.values[layer][block, :, offset] = self._stored(v, layer, 1).transpose(1, 2)

    def layer_scales(self, layer: int) -> torch.Tensor | None:
        """[2, Hkv] of one layer (what the kernels take), None without fp8."""
        return self.scales[layer] if self.fp8 else None

    def _stored(self, x: torch.Tensor, layer: int, which: int) -> torch.Tensor:
        """k or v [B,Hkv,T,D] as the cache holds them."""
        if not self.fp8:
            return x
        scale = self.scales[layer, which][None, :, None, None]
        return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)

    def gather(self, layer: int, rows: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of slots `rows` [B] at positions 0..length-1: [B, Hkv, length, D] each,
        copied out through the tables (the torch ops' attention reads them)."""
        blocks = self.table[rows, : blocks_for(length, self.block_size)]
        out = [read_pages(cache[layer], blocks)[:, :, :length] for cache in (self.keys, self.values)]
        if self.fp8:
            out = [(x.float() * self.scales[layer, i][None, :, None, None]).to(self.dtype) for i, x in enumerate(out)]
        return tuple(out)


@torch.no_grad()
def measure_kv_scales(model, device, rows: int = 4, length: int = 128, seed: int = 0) -> torch.Tensor:
    """[layers, 2, Hkv] fp8 scales of the keys and values `model` computes for random tokens (no
    calibration text needed; FP8_HEADROOM over the largest each head showed), in one forward pass."""
    sh = model.shape
    ids = torch.randint(3, sh.vocab_size, (rows, length), generator=torch.Generator().manual_seed(seed)).to(device)
    positions = torch.arange(length, device=device)[None].expand(rows, -1)
    causal = torch.full((length, length), float("-inf"), device=device).triu(1)[None, None].expand(rows, 1, -1, -1)
    past = torch.zeros((sh.num_layers, rows, sh.num_kv_heads, 0, sh.head_dim), device=device, dtype=model.embed.dtype)
    last = torch.full((rows,), length - 1, device=device)
    _, keys, values = model(ids, positions, causal.to(past.dtype), last, past, past)  # [L, B, Hkv, T, D] each
    found = torch.stack([x.float().abs().amax(dim=(1, 3, 4)) for x in (keys, values)], dim=1)  # [L, 2, Hkv]
    return (found.clamp(min=1e-6) * FP8_HEADROOM / FP8_MAX).cpu()


def kv_scales_for(cfg: EngineConfig, model, device: torch.device) -> torch.Tensor | None:
    """The fp8 cache's scales where `kv_cache_dtype` asks for fp8 (refused on a GPU without FP8
    conversions), else None."""
    if cfg.kv_cache_dtype != "fp8":
        return None
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise ValueError(
            f"kv_cache_dtype=fp8 needs FP8 conversions (compute capability >= 8.9); {name} has "
            f"{torch.cuda.get_device_capability(device)}: build with --kv-cache-dtype auto"
        )
    scales = measure_kv_scales(model, device)
    log.info("fp8 KV cache: scales per layer and KV head from random tokens, %.3g..%.3g", scales.min(), scales.max())
    return scales


def size_blocks(shape: ModelShape, cfg: EngineConfig, dtype: torch.dtype, device: torch.device) -> int:
    """Blocks for the KV pool: `kv_cache_tokens` where set; else what `kv_cache_memory_fraction` of the
    device's free memory holds, at most every slot at max_context (more would never be used), at
    least one sequence at max_context (else a long request could never be admitted). Off CUDA:
    every slot at max_context."""
    per_seq = blocks_for(cfg.max_context)
    most = cfg.max_slots * per_seq
    if cfg.kv_cache_tokens:
        return blocks_for(cfg.kv_cache_tokens)
    if device.type != "cuda":
        return most
    free, _ = torch.cuda.mem_get_info(device)
    per_block = PagedDeviceCache.bytes_per_block(shape, dtype)
    fit = int(free * cfg.kv_cache_memory_fraction) // per_block - 1  # one is the scratch block
    if fit < per_seq:
        raise RuntimeError(
            f"no room for one sequence of {cfg.max_context} tokens ({per_seq * per_block / 2**20:.0f} MiB of KV "
            f"cache) in {cfg.kv_cache_memory_fraction:.0%} of {free / 2**30:.1f} GiB free: lower max_context "
            "or raise kv_cache_memory_fraction"
        )
    blocks = min(fit, most)
    log.info(
        "KV cache: %d blocks of %d tokens (%.2f GiB): %d tokens, %.1f sequences at max_context %d",
        blocks,
        BLOCK_SIZE,
        blocks * per_block / 2**30,
        blocks * BLOCK_SIZE,
        blocks / per_seq,
        cfg.max_context,
    )
    return blocks
