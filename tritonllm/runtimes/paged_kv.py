"""Paged host KV cache with prefix caching, for the runtimes that run the exported graph on the host
(ONNX Runtime). Keys/values live in fixed-size blocks of one pool; each slot holds a table of its
blocks. A full block is registered under the hash of its tokens and of every token before it
(the chain of its predecessors), so a later prompt that starts with the same tokens takes those
blocks instead of computing them again. Blocks are reference-counted; a registered block nobody
holds stays cached until the pool needs it (least recently released first)."""

from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np

from ..model.shape import ModelShape

BLOCK_SIZE = 16


class OutOfBlocksError(RuntimeError):
    pass


@dataclass
class PrefixStats:
    queried_tokens: int = 0  # prompt tokens looked up in the prefix cache
    hit_tokens: int = 0  # ... found there (their keys/values not computed again)
    evicted_blocks: int = 0  # cached blocks taken back for new keys/values


class BlockPool:
    """Block ids 0..n-1: free, held (reference count > 0), or cached and unheld (evictable, LRU)."""

    def __init__(self, num_blocks: int):
        self.free = collections.deque(range(num_blocks))
        self.refs = [0] * num_blocks
        self.by_hash: dict[int, int] = {}  # chain hash -> block
        self.key_of: dict[int, tuple[int, tuple[int, ...]]] = {}  # block -> (chain hash, its tokens)
        self.evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.stats = PrefixStats()

    @property
    def available(self) -> int:
        return len(self.free) + len(self.evictable)

    def allocate(self) -> int:
        """A block for new keys/values: a free one, else the least recently released cached one."""
        if self.free:
            block = self.free.popleft()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)
            chain, _ = self.key_of.pop(block)
            del self.by_hash[chain]
            self.stats.evicted_blocks += 1
        else:
            raise OutOfBlocksError("every KV block is held by a sequence")
        self.refs[block] = 1
        return block

    def lookup(self, chain: int, tokens: tuple[int, ...]) -> int | None:
        """The cached block of this chain hash holding exactly `tokens` (a hash collision is a miss)."""
        block = self.by_hash.get(chain)
        if block is None or self.key_of[block][1] != tokens:
            return None
        return block

    def acquire(self, block: int) -> None:
        self.refs[block] += 1
        self.evictable.pop(block, None)

    def release(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if block in self.key_of:
                self.evictable[block] = None
            else:
                self.free.append(block)

    def register(self, block: int, chain: int, tokens: tuple[int, ...]) -> None:
        """Make a full block findable by its chain hash (unless an equal block already is)."""
        if chain not in self.by_hash and block not in self.key_of:
            self.by_hash[chain] = block
            self.key_of[block] = (chain, tokens)


def chain_hash(previous: int, tokens: tuple[int, ...]) -> int:
    return hash((previous, tokens))


class PagedKVCache:
    """Keys/values [layers, kv_heads, blocks, BLOCK_SIZE, head_dim] and per slot its block table,
    the tokens whose keys/values it holds, and their blocks' chain hashes. Sized for every slot at
    `max_context` (nothing is ever refused for lack of blocks); blocks a slot does not use hold
    cached prefixes meanwhile."""

    def __init__(self, shape: ModelShape, slots: int, max_context: int, prefix_cache: bool = True, dtype=np.float32):
        blocks_per_slot = -(-max_context // BLOCK_SIZE)
        dims = (shape.num_layers, shape.num_kv_heads, slots * blocks_per_slot, BLOCK_SIZE, shape.head_dim)
        self.keys = np.zeros(dims, dtype=dtype)
        self.values = np.zeros(dims, dtype=dtype)
        self.layers, self.kv_heads, self.head_dim = shape.num_layers, shape.num_kv_heads, shape.head_dim
        self.max_context = max_context
        self.pool = BlockPool(dims[2])
        self.prefix_cache = prefix_cache
        self.tables: list[list[int]] = [[] for _ in range(slots)]
        self.tokens: list[list[int]] = [[] for _ in range(slots)]
        self.chains: list[list[int]] = [[] for _ in range(slots)]  # chain hash of each full block
        self.reused = [0] * slots  # prompt tokens each slot's sequence found cached (`begin`)
        self._scratch = (np.empty(0, dtype), np.empty(0, dtype))

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    @property
    def stats(self) -> PrefixStats:
        return self.pool.stats

    def begin(self, slot: int, start: int, tokens: list[int]) -> int:
        """A prefill row for `slot`: a new sequence at start 0 drops the slot's old blocks. Returns
        how many of `tokens` (from their start) are already cached and need no computing: whole
        blocks of a matching prefix, never the last token (its logits are wanted)."""
        if start == 0:
            self._drop(slot)
            self.reused[slot] = 0
        if len(self.tokens[slot]) != start:
            raise ValueError(f"slot {slot} holds {len(self.tokens[slot])} positions, a piece starts at {start}")
        if not self.prefix_cache or start % BLOCK_SIZE:
            return 0
        self.pool.stats.queried_tokens += len(tokens)
        reused = 0
        while reused + BLOCK_SIZE < len(tokens):
            block_tokens = tuple(tokens[reused : reused + BLOCK_SIZE])
            chain = chain_hash(self.chains[slot][-1] if self.chains[slot] else 0, block_tokens)
            block = self.pool.lookup(chain, block_tokens)
            if block is None:
                break
            self.pool.acquire(block)
            self.tables[slot].append(block)
            self.chains[slot].append(chain)
            self.tokens[slot].extend(block_tokens)
            reused += BLOCK_SIZE
        self.pool.stats.hit_tokens += reused
        self.reused[slot] += reused
        return reused

    def _drop(self, slot: int) -> None:
        for block in self.tables[slot]:
            self.pool.release(block)
        self.tables[slot], self.tokens[slot], self.chains[slot] = [], [], []

    def update(self, slots: list[int], starts: list[int], tokens: list[list[int]], new_keys, new_values) -> None:
        """Write row b's keys/values for `tokens[b]` at positions starts[b].. of slots[b] (into new
        blocks as they are needed), and register each block it fills."""
        for b, (slot, start, toks) in enumerate(zip(slots, starts, tokens)):
            if len(self.tokens[slot]) != start:
                raise ValueError(f"slot {slot} holds {len(self.tokens[slot])} positions, new ones start at {start}")
            done = 0
            while done < len(toks):
                pos = start + done
                if pos // BLOCK_SIZE == len(self.tables[slot]):
                    self.tables[slot].append(self.pool.allocate())
                block, off = self.tables[slot][pos // BLOCK_SIZE], pos % BLOCK_SIZE
                n = min(BLOCK_SIZE - off, len(toks) - done)
                self.keys[:, :, block, off : off + n] = new_keys[:, b, :, done : done + n]
                self.values[:, :, block, off : off + n] = new_values[:, b, :, done : done + n]
                done += n
            self.tokens[slot].extend(toks)
            self._register_full(slot)

    def _register_full(self, slot: int) -> None:
        chains, toks = self.chains[slot], self.tokens[slot]
        while (len(chains) + 1) * BLOCK_SIZE <= len(toks):
            i = len(chains)
            block_tokens = tuple(toks[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE])
            chains.append(chain_hash(chains[-1] if chains else 0, block_tokens))
            if self.prefix_cache:
                self.pool.register(self.tables[slot][i], chains[-1], block_tokens)

    def gather(self, slots: list[int], length: int, out: tuple | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Past keys/values of `slots` up to `length` positions: [L, B, Hkv, length, D] (zeros where a
        slot holds fewer: the attention bias masks them), copied into `out` or into scratch buffers
        kept between calls."""
        from .host_kv import staged

        layers, kv_heads, _, _, d = self.keys.shape
        dims = (layers, len(slots), kv_heads, length, d)
        if out is None:
            self._scratch, out = staged(self._scratch, dims)
        for b, slot in enumerate(slots):
            held = min(length, len(self.tokens[slot]))
            table = self.tables[slot][: -(-held // BLOCK_SIZE)]
            for src, dst in zip((self.keys, self.values), out):
                rows = src[:, :, table].reshape(layers, kv_heads, len(table) * BLOCK_SIZE, d)
                dst[:, b, :, :held] = rows[:, :, :held]
                dst[:, b, :, held:] = 0  # masked, but must be finite: a masked NaN still poisons softmax
        return out
