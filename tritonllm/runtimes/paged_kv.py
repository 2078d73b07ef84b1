"""Paged KV cache bookkeeping with prefix caching, and the host storage of the runtimes that run the
exported graph on the host (ONNX Runtime). Keys/values live in fixed-size blocks of one pool; each
slot holds a table of its blocks. A full block is registered under the hash of its tokens and of
every token before it (the chain of its predecessors), so a later prompt that starts with the same
tokens takes those blocks instead of computing them again. Blocks are reference-counted; a
registered block nobody holds stays cached until the pool needs it (least recently released first).

Admission is by blocks: a sequence is admitted only when the pool can promise it blocks (`reserve`).
Under TensorRT-LLM's "guaranteed no evict" policy the promise covers its longest possible length
(prompt + max_tokens, at most max_context) and nothing is ever preempted; under "max utilization"
it covers what the next step writes and grows step by step, the scheduler preempting a sequence
when the pool cannot keep a promise. A slot is only a row of the batch, never a reservation of
max_context tokens."""

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
        self.size = num_blocks
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
        self.acquire_all((block,))

    def acquire_all(self, blocks) -> None:
        """Hold cached blocks (a prefix found for a new sequence): none of them can be evicted."""
        refs, evictable = self.refs, self.evictable
        for block in blocks:
            refs[block] += 1
            if refs[block] == 1:  # held by nobody until now: it may have waited for eviction
                evictable.pop(block, None)

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


def shared_blocks(a: list[int], b: list[int], most: int, size: int) -> int:
    """How many whole blocks (at most `most`) `a` and `b` share from their start: a binary search of
    list-slice comparisons, each over the span not yet known equal (linear in the tokens, in C)."""
    if a[: most * size] == b[: most * size]:
        return most
    lo, hi = 0, most - 1  # the blocks shared lie in [lo, hi]: the first lo are known equal
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo * size : mid * size] == b[lo * size : mid * size]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def blocks_for(tokens: int, block_size: int = BLOCK_SIZE) -> int:
    return -(-tokens // block_size)


class BlockTables:
    """Per slot: its block table, the tokens known at its first positions (a prompt's; a runtime
    that samples on the device never learns the rest, so only prompt blocks are registered there),
    their full blocks' chain hashes, and the blocks promised to it at admission (`reserve`).
    `dirty` collects the table entries that changed, for a runtime that mirrors the tables on a device."""

    def __init__(self, num_blocks: int, slots: int, prefix_cache: bool = True, block_size: int = BLOCK_SIZE):
        self.pool = BlockPool(num_blocks)
        self.prefix_cache, self.block_size = prefix_cache, block_size
        self.tables: list[list[int]] = [[] for _ in range(slots)]
        self.tokens: list[list[int]] = [[] for _ in range(slots)]
        self.chains: list[list[int]] = [[] for _ in range(slots)]  # chain hash of each full block
        self.reused = [0] * slots  # prompt tokens each slot's sequence found cached (`begin`)
        self.reserved = [0] * slots  # blocks promised to each slot's sequence (0: none promised)
        self.owed = 0  # promised blocks not yet in their slot's table, over all slots
        self.dirty: dict[int, list[int]] = {}  # slot -> [first, end) of table entries changed since `take_dirty`
        # the last lookup that found blocks: (the chain it started after, their tokens, what it found,
        # the pool's evictions then)
        self._recent: tuple[int, list[int], list[tuple[int, int]], int] | None = None

    @property
    def stats(self) -> PrefixStats:
        return self.pool.stats

    def _owed(self, slot: int) -> int:
        return max(0, self.reserved[slot] - len(self.tables[slot]))

    def _mark(self, slot: int, first: int, end: int) -> None:
        span = self.dirty.setdefault(slot, [first, end])
        span[0], span[1] = min(span[0], first), max(span[1], end)

    def take_dirty(self) -> dict[int, list[int]]:
        dirty, self.dirty = self.dirty, {}
        return dirty

    def _take(self, slot: int, block: int) -> None:
        self.owed -= self._owed(slot) > 0
        self._mark(slot, len(self.tables[slot]), len(self.tables[slot]) + 1)
        self.tables[slot].append(block)

    def reserve(self, slot: int, tokens: int, spare: int = 0) -> int:
        """Promise `slot` the blocks of `tokens` positions (a promise only grows) if the pool can keep
        every promise made and still has `spare` blocks besides. Returns the positions promised
        now, whole blocks (0: refused, nothing changed)."""
        need = max(blocks_for(tokens, self.block_size), self.reserved[slot])
        others = self.owed - self._owed(slot)
        if self.pool.available - others - spare < need - len(self.tables[slot]):
            return 0
        self.reserved[slot] = need
        self.owed = others + self._owed(slot)
        return need * self.block_size

    def release(self, slot: int) -> None:
        """The slot's sequence ended: its blocks go back (full registered ones stay cached) and its
        promise ends."""
        self._drop(slot)
        self.owed -= self._owed(slot)
        self.reserved[slot] = 0

    def _drop(self, slot: int) -> None:
        """The slot's blocks go back; what it is owed grows by them (its promise stands)."""
        self.owed -= self._owed(slot)
        for block in self.tables[slot]:
            self.pool.release(block)
        if self.tables[slot]:
            self._mark(slot, 0, len(self.tables[slot]))
        self.tables[slot], self.tokens[slot], self.chains[slot] = [], [], []
        self.owed += self._owed(slot)

    def begin(self, slot: int, start: int, tokens: list[int]) -> int:
        """A prefill row for `slot`: a new sequence at start 0 drops the slot's old blocks. Returns
        how many of `tokens` (from their start) are already cached and need no computing: whole
        blocks of a matching prefix, never the last token (its logits are wanted)."""
        if start == 0:
            self._drop(slot)
            self.reused[slot] = 0
        self.check_start(slot, start)
        size = self.block_size
        if not self.prefix_cache or start % size:
            return 0
        self.pool.stats.queried_tokens += len(tokens)
        found = self._cached_blocks(tokens, self.chains[slot][-1] if self.chains[slot] else 0)
        reused = len(found) * size
        if found:  # taken at once: one dirty span, one change of what is owed
            table = self.tables[slot]
            self.owed -= min(len(found), self._owed(slot))
            self._mark(slot, len(table), len(table) + len(found))
            blocks, chains = zip(*found)
            self.pool.acquire_all(blocks)
            table.extend(blocks)
            self.chains[slot].extend(chains)
            self.tokens[slot].extend(tokens[:reused])
        self.pool.stats.hit_tokens += reused
        self.reused[slot] += reused
        return reused

    def _cached_blocks(self, tokens: list[int], chain: int) -> list[tuple[int, int]]:
        """(block, chain hash) of each whole block of `tokens` found cached, from the first, after a
        prefix whose chain hash is `chain`; never the block of the last token. Takes nothing. A burst
        of prompts with a long shared prefix runs this for each prompt twice (admission, then the
        step), on the engine loop's thread: the blocks a prompt shares with the last one looked up
        are taken from that lookup (`_recent_blocks`), so only the rest are hashed."""
        size, after = self.block_size, chain
        whole = (len(tokens) - 1) // size  # the blocks before the one holding the last token
        found = self._recent_blocks(tokens, chain, whole)
        lookup = self.pool.lookup
        chain = found[-1][1] if found else chain
        for start in range(len(found) * size, whole * size, size):
            block_tokens = tuple(tokens[start : start + size])
            chain = chain_hash(chain, block_tokens)
            block = lookup(chain, block_tokens)
            if block is None:
                break
            found.append((block, chain))
        if found:
            self._recent = (after, tokens[: len(found) * size], found, self.pool.stats.evicted_blocks)
        return found

    def _recent_blocks(self, tokens: list[int], chain: int, whole: int) -> list[tuple[int, int]]:
        """The last lookup's found blocks that `tokens` starts with (same tokens after the same
        chain), as long as each still holds its chain hash: compared as token lists, not hashed. A
        block leaves the cache only when evicted: with no eviction since, each still does."""
        recent = self._recent
        if recent is None or whole == 0 or recent[0] != chain:
            return []
        _, recent_tokens, recent_found, evicted = recent
        n = shared_blocks(tokens, recent_tokens, min(whole, len(recent_found)), self.block_size)
        by_hash, found = self.pool.by_hash, recent_found[:n]
        if evicted == self.pool.stats.evicted_blocks:
            return found
        for i, (block, chain_i) in enumerate(found):
            if by_hash.get(chain_i) != block:  # evicted since: look the rest up again
                return found[:i]
        return found

    def cached_prefix(self, tokens: list[int]) -> int:
        """How many of `tokens` (from the first) a lookup would find cached now: whole blocks, never
        the last token. Takes nothing."""
        return len(self._cached_blocks(tokens, 0)) * self.block_size if self.prefix_cache else 0

    def counts(self) -> dict[str, int]:
        """The prefix cache's and the pool's counters, as `RuntimeStats` fields."""
        stats, pool = self.pool.stats, self.pool
        return {
            "prefix_queried_tokens": stats.queried_tokens,
            "prefix_hit_tokens": stats.hit_tokens,
            "kv_blocks": pool.size,
            "kv_blocks_available": pool.available,
        }

    def check_start(self, slot: int, start: int) -> None:
        if len(self.tokens[slot]) != start:
            raise ValueError(f"slot {slot} holds {len(self.tokens[slot])} positions, a piece starts at {start}")

    def ensure(self, slot: int, length: int) -> None:
        """Blocks for positions 0..length-1 of `slot`, but never beyond its promise where it has one:
        positions past it (a multi-step run's tokens after its sequence's end) have no block, and
        a runtime sends their writes to a scratch block."""
        need = blocks_for(length, self.block_size)
        if self.reserved[slot]:
            need = min(need, self.reserved[slot])
        while len(self.tables[slot]) < need:
            self._take(slot, self.pool.allocate())

    def record(self, slot: int, start: int, tokens: list[int]) -> None:
        """`tokens` are at positions start.. of `slot` (their blocks ensured): each block they fill
        is registered for prefix reuse."""
        self.check_start(slot, start)
        self.tokens[slot].extend(tokens)
        chains, toks, size = self.chains[slot], self.tokens[slot], self.block_size
        while (len(chains) + 1) * size <= len(toks):
            i = len(chains)
            block_tokens = tuple(toks[i * size : (i + 1) * size])
            chains.append(chain_hash(chains[-1] if chains else 0, block_tokens))
            if self.prefix_cache:
                self.pool.register(self.tables[slot][i], chains[-1], block_tokens)


class PagedAdmission:
    """The KV admission seam (`Runtime.reserve_kv` and the rest) of a runtime whose cache keeps its
    blocks in `BlockTables` (`self.blocks`); listed before `Runtime` among its bases."""

    blocks: BlockTables

    def reserve_kv(self, slot: int, tokens: int, spare: int = 0) -> int:
        return self.blocks.reserve(slot, tokens, spare)

    def release_kv(self, slot: int) -> None:
        self.blocks.release(slot)

    def cached_prompt_tokens(self, prompt: list[int]) -> int:
        return self.blocks.cached_prefix(prompt)

    def reused_prompt_tokens(self, slot: int) -> int:
        return self.blocks.reused[slot]

    def prefix_block_tokens(self) -> int:
        return self.blocks.block_size if self.blocks.prefix_cache else 0


class PagedKVCache:
    """Host keys/values [layers, kv_heads, blocks, BLOCK_SIZE, head_dim] behind `BlockTables`: `tokens`
    positions, by default every slot at `max_context` (admission never waits for blocks); blocks a
    slot does not use hold cached prefixes meanwhile."""

    def __init__(
        self,
        shape: ModelShape,
        slots: int,
        max_context: int,
        prefix_cache: bool = True,
        dtype=np.float32,
        tokens: int = 0,
    ):
        blocks = blocks_for(tokens) if tokens else slots * blocks_for(max_context)
        dims = (shape.num_layers, shape.num_kv_heads, blocks, BLOCK_SIZE, shape.head_dim)
        self.keys = np.zeros(dims, dtype=dtype)
        self.values = np.zeros(dims, dtype=dtype)
        self.layers, self.kv_heads, self.head_dim = shape.num_layers, shape.num_kv_heads, shape.head_dim
        self.max_context = max_context
        self.blocks = BlockTables(dims[2], slots, prefix_cache)
        self.begin = self.blocks.begin
        self._scratch = (np.empty(0, dtype), np.empty(0, dtype))

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    @property
    def prefix_cache(self) -> bool:
        return self.blocks.prefix_cache

    @property
    def stats(self) -> PrefixStats:
        return self.blocks.stats

    @property
    def tables(self) -> list[list[int]]:
        return self.blocks.tables

    @property
    def chains(self) -> list[list[int]]:
        return self.blocks.chains

    @property
    def reused(self) -> list[int]:
        return self.blocks.reused

    def update(self, slots: list[int], starts: list[int], tokens: list[list[int]], new_keys, new_values) -> None:
        """Write row b's keys/values for `tokens[b]` at positions starts[b].. of slots[b] (into new
        blocks as they are needed), and register each block it fills."""
        for b, (slot, start, toks) in enumerate(zip(slots, starts, tokens)):
            self.blocks.check_start(slot, start)
            self.blocks.ensure(slot, start + len(toks))
            table, done = self.tables[slot], 0
            while done < len(toks):
                pos = start + done
                block, off = table[pos // BLOCK_SIZE], pos % BLOCK_SIZE
                n = min(BLOCK_SIZE - off, len(toks) - done)
                self.keys[:, :, block, off : off + n] = new_keys[:, b, :, done : done + n]
                self.values[:, :, block, off : off + n] = new_values[:, b, :, done : done + n]
                done += n
            self.blocks.record(slot, start, toks)

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
            held = min(length, len(self.blocks.tokens[slot]))
            table = self.tables[slot][: blocks_for(held)]
            for src, dst in zip((self.keys, self.values), out):
                rows = src[:, :, table].reshape(layers, kv_heads, len(table) * BLOCK_SIZE, d)
                dst[:, b, :, :held] = rows[:, :, :held]
                dst[:, b, :, held:] = 0  # masked, but must be finite: a masked NaN still poisons softmax
        return out
