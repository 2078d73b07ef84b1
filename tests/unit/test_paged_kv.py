"""The paged host KV cache: the block pool (allocation, reference counts, LRU eviction of cached
blocks, running out), prefix lookup by chain hash (collisions are misses), and the cache's block
tables (writes across blocks, reuse of whole blocks of a prefix, never a prompt's last token)."""

import numpy as np
import pytest

from tritonllm.model.shape import ModelShape
from tritonllm.runtimes.paged_kv import (
    BLOCK_SIZE,
    BlockPool,
    BlockTables,
    OutOfBlocksError,
    PagedKVCache,
    chain_hash,
    shared_blocks,
)

SHAPE = ModelShape(2, 4, 2, 8, 32, 100, 1024, (0,), None, None)


def test_pool_allocates_free_blocks_then_evicts_the_least_recently_released_cached_one():
    pool = BlockPool(3)
    a, b, c = pool.allocate(), pool.allocate(), pool.allocate()
    pool.register(a, 11, (1,))
    pool.register(b, 22, (2,))
    pool.release(b)  # cached, unheld: evictable, released first
    pool.release(a)
    pool.release(c)  # not cached: back to the free list
    assert pool.available == 3 and pool.allocate() == c  # a free block before any eviction
    assert pool.allocate() == b and pool.lookup(22, (2,)) is None  # evicted: no longer found
    assert pool.lookup(11, (1,)) == a and pool.stats.evicted_blocks == 1
    pool.acquire(a)  # held again: not evictable
    with pytest.raises(OutOfBlocksError):
        pool.allocate()


def test_a_shared_block_stays_until_its_last_holder_releases_it():
    pool = BlockPool(1)
    block = pool.allocate()
    pool.register(block, 5, (7, 8))
    pool.acquire(block)
    pool.release(block)
    assert pool.available == 0  # still held once
    pool.release(block)
    assert pool.available == 1 and pool.lookup(5, (7, 8)) == block


def test_a_hash_collision_is_a_miss():
    pool = BlockPool(2)
    block = pool.allocate()
    pool.register(block, 99, (1, 2, 3))
    assert pool.lookup(99, (1, 2, 4)) is None  # same hash, other tokens


def kv(n, seed):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((2, 1, 2, n, 8)).astype(np.float32)
    return k, k + 100


def test_writes_across_blocks_read_back_in_order_and_unheld_positions_read_zero():
    cache = PagedKVCache(SHAPE, slots=2, max_context=64)
    k, v = kv(40, 0)
    cache.update([1], [0], [list(range(40))], k, v)
    k2, v2 = kv(1, 1)
    cache.update([1], [40], [[40]], k2, v2)
    past_k, past_v = cache.gather([1, 0], 48)
    np.testing.assert_array_equal(past_k[:, 0, :, :40], k[:, 0])
    np.testing.assert_array_equal(past_v[:, 0, :, 40], v2[:, 0, :, 0])
    assert not past_k[:, 0, :, 41:].any() and not past_k[:, 1].any()
    assert len(cache.tables[1]) == 3 and len(cache.chains[1]) == 2  # two full blocks registered


def test_a_new_prompt_reuses_whole_cached_blocks_of_its_prefix_but_computes_its_last_token():
    cache = PagedKVCache(SHAPE, slots=2, max_context=128)
    prompt = list(range(1, 2 * BLOCK_SIZE + 1))  # exactly two blocks
    k, v = kv(len(prompt), 2)
    assert cache.begin(0, 0, prompt) == 0
    cache.update([0], [0], [prompt], k, v)
    assert cache.begin(1, 0, prompt) == BLOCK_SIZE  # the second block holds the last token: computed
    assert cache.begin(1, 0, prompt + [5]) == 2 * BLOCK_SIZE
    past_k, _ = cache.gather([1], 2 * BLOCK_SIZE)
    np.testing.assert_array_equal(past_k[:, 0], k[:, 0])
    assert cache.tables[1] == cache.tables[0]  # the same blocks, shared
    assert cache.begin(1, 0, [9] + prompt) == 0  # another first token: another chain
    assert cache.stats.hit_tokens == 3 * BLOCK_SIZE


def test_each_slot_counts_the_prompt_tokens_it_found_cached_over_its_pieces():
    """What the final response reports: the whole prompt's reuse (pieces add up; a new sequence in
    the slot starts from zero)."""
    cache = PagedKVCache(SHAPE, slots=2, max_context=128)
    prompt = list(range(1, 3 * BLOCK_SIZE + 2))
    cache.begin(0, 0, prompt)
    cache.update([0], [0], [prompt], *kv(len(prompt), 4))
    first, rest = prompt[: 2 * BLOCK_SIZE], prompt[2 * BLOCK_SIZE :]
    assert cache.begin(1, 0, first) == BLOCK_SIZE  # a piece keeps its last token to compute
    cache.update([1], [BLOCK_SIZE], [first[BLOCK_SIZE:]], *kv(BLOCK_SIZE, 5))
    assert cache.begin(1, 2 * BLOCK_SIZE, rest) == BLOCK_SIZE and cache.reused[1] == 2 * BLOCK_SIZE
    assert cache.begin(1, 0, [7, 8]) == 0 and cache.reused[1] == 0
    assert cache.reused[0] == 0


def test_dropping_a_slot_leaves_its_full_blocks_cached_for_the_next_prompt():
    cache = PagedKVCache(SHAPE, slots=1, max_context=64)
    prompt = list(range(100, 100 + BLOCK_SIZE + 3))
    cache.begin(0, 0, prompt)
    cache.update([0], [0], [prompt], *kv(len(prompt), 3))
    assert cache.begin(0, 0, prompt) == BLOCK_SIZE  # the slot's own old block, found after the drop
    off = PagedKVCache(SHAPE, slots=1, max_context=64, prefix_cache=False)
    off.begin(0, 0, prompt)
    off.update([0], [0], [prompt], *kv(len(prompt), 3))
    assert off.begin(0, 0, prompt) == 0 and off.stats.queried_tokens == 0


def test_a_piece_must_start_where_the_slot_ends():
    cache = PagedKVCache(SHAPE, slots=1, max_context=64)
    with pytest.raises(ValueError, match="slot 0 holds 0 positions, a piece starts at 16"):
        cache.begin(0, 16, [1, 2])


def test_chain_hash_depends_on_everything_before():
    assert chain_hash(chain_hash(0, (1,)), (2,)) != chain_hash(chain_hash(0, (3,)), (2,))


def test_admission_promises_only_blocks_the_pool_can_keep():
    """reserve: a sequence's longest length in blocks, against free + evictable blocks less what
    was promised before and not yet taken; release returns both the blocks and the promise."""
    tables = BlockTables(num_blocks=6, slots=3)
    assert tables.reserve(0, 3 * BLOCK_SIZE)  # 3 of 6 promised
    assert not tables.reserve(1, 4 * BLOCK_SIZE)  # 4 > 6 - 3
    assert tables.reserve(1, 2 * BLOCK_SIZE + 1)  # 3 blocks: all promised now
    assert not tables.reserve(2, 1)
    tables.ensure(0, 2 * BLOCK_SIZE)  # taking promised blocks changes nothing for others
    assert not tables.reserve(2, 1) and tables.owed == 4
    tables.release(0)
    assert tables.owed == 3 and tables.reserve(2, 3 * BLOCK_SIZE)


def test_a_slot_never_takes_blocks_past_its_promise():
    """A multi-step run may write past its sequence's end: those positions get no block (the device
    runtime sends their writes to its scratch block), so the pool never runs dry for a promise."""
    tables = BlockTables(num_blocks=4, slots=2)
    tables.reserve(0, BLOCK_SIZE + 1)  # 2 blocks
    tables.ensure(0, 4 * BLOCK_SIZE)
    assert len(tables.tables[0]) == 2 and tables.pool.available == 2
    assert tables.take_dirty() == {0: [0, 2]}
    tables.release(0)
    assert tables.take_dirty() == {0: [0, 2]}  # the entries to point back at scratch


def test_prefix_hits_count_against_a_promise():
    """Blocks found in the prefix cache are blocks the sequence need not take from the pool."""
    tables = BlockTables(num_blocks=4, slots=2)
    prompt = list(range(2 * BLOCK_SIZE + 1))
    tables.reserve(0, 3 * BLOCK_SIZE)
    tables.ensure(0, len(prompt))
    tables.record(0, 0, prompt)
    tables.release(0)  # two full blocks stay cached (evictable), one goes back free
    assert tables.pool.available == 4
    assert tables.reserve(1, 4 * BLOCK_SIZE) and tables.owed == 4
    assert tables.begin(1, 0, prompt) == 2 * BLOCK_SIZE
    assert tables.owed == 2 and tables.pool.available == 2
    assert not tables.reserve(0, 1)


def test_a_cached_prefix_is_counted_without_being_taken():
    tables = BlockTables(num_blocks=4, slots=2)
    prompt = list(range(2 * BLOCK_SIZE + 1))
    tables.ensure(0, len(prompt))
    tables.record(0, 0, prompt)
    assert (
        tables.cached_prefix(prompt) == 2 * BLOCK_SIZE and tables.cached_prefix(prompt[: 2 * BLOCK_SIZE]) == BLOCK_SIZE
    )
    assert tables.cached_prefix([7] + prompt) == 0 and tables.pool.refs == [1, 1, 1, 0]  # nothing taken


def test_a_promise_grows_against_the_others_and_keeps_spare_blocks():
    """max-utilization grows a running sequence's promise step by step: its own promise is not
    counted against it, a smaller request keeps what it has, and `spare` blocks stay unpromised."""
    tables = BlockTables(num_blocks=6, slots=2)
    assert tables.reserve(0, BLOCK_SIZE) == BLOCK_SIZE
    assert tables.reserve(1, BLOCK_SIZE, spare=4) == BLOCK_SIZE  # 6 - 1 promised - 4 spare = 1 left
    assert tables.reserve(0, 1) == BLOCK_SIZE and tables.owed == 2  # never shrinks
    assert tables.reserve(0, 4 * BLOCK_SIZE) == 4 * BLOCK_SIZE and tables.owed == 5
    assert tables.reserve(0, 5 * BLOCK_SIZE + 1) == 0 and tables.reserved[0] == 4  # refused: nothing changed
    tables.ensure(0, 4 * BLOCK_SIZE)
    assert tables.reserve(0, 5 * BLOCK_SIZE) == 5 * BLOCK_SIZE and tables.owed == 2
    tables.release(0)
    assert tables.owed == 1 and tables.pool.available == 6


def test_shared_blocks_counts_the_whole_blocks_two_lists_start_with():
    rng = np.random.default_rng(3)
    for _ in range(200):
        a = rng.integers(0, 3, int(rng.integers(0, 40))).tolist()
        b = a[: int(rng.integers(0, len(a) + 1))] + rng.integers(0, 3, int(rng.integers(0, 10))).tolist()
        size, most = int(rng.integers(1, 5)), int(rng.integers(0, 12))
        most = min(most, len(a) // size, len(b) // size)
        brute = next((k for k in range(most + 1) if a[k * size : (k + 1) * size] != b[k * size : (k + 1) * size]), most)
        assert shared_blocks(a, b, most, size) == min(brute, most)


def test_a_burst_sharing_a_prefix_finds_what_a_lookup_from_scratch_finds():
    """Lookups reuse the last lookup's blocks for the tokens a prompt shares with it
    (`_recent_blocks`): prompts that share all, part or none of it, or start after a cached past,
    find exactly what hashing every block finds."""
    rng = np.random.default_rng(1)
    system = rng.integers(3, 50, 5 * BLOCK_SIZE).tolist()
    tables = BlockTables(num_blocks=64, slots=2)
    tables.ensure(0, len(system) + 1)
    tables.record(0, 0, system + [9])
    probes = [
        system + [1, 2],  # all of it
        system[: 3 * BLOCK_SIZE] + [1] * 40,  # part of it, then tokens of its own
        system[:BLOCK_SIZE] + [7] + system[BLOCK_SIZE + 1 :],  # differs inside the second block
        [8] + system,  # none of it
        system + [3],
    ]
    for probe in probes:
        fresh = BlockTables(num_blocks=1, slots=1)
        fresh.pool, fresh.prefix_cache = tables.pool, True  # the same cache, no recent lookup
        assert tables.cached_prefix(probe) == fresh.cached_prefix(probe)
        assert tables._cached_blocks(probe[BLOCK_SIZE:], tables.chains[0][0]) == fresh._cached_blocks(
            probe[BLOCK_SIZE:], tables.chains[0][0]
        )
    assert [tables.cached_prefix(p) for p in probes] == [5 * BLOCK_SIZE, 3 * BLOCK_SIZE, BLOCK_SIZE, 0, 5 * BLOCK_SIZE]


def test_a_recent_lookups_blocks_evicted_since_are_not_found():
    """A block the last lookup found, evicted and refilled since, is a miss for the next prompt."""
    system = list(range(3, 3 + 3 * BLOCK_SIZE))
    tables = BlockTables(num_blocks=3, slots=2)
    tables.ensure(0, len(system))
    tables.record(0, 0, system)
    assert tables.cached_prefix(system + [1]) == 3 * BLOCK_SIZE  # remembered as the recent lookup
    tables.release(0)  # all three cached, unheld
    tables.pool.allocate()  # evicts the first: the chain breaks there
    assert tables.cached_prefix(system + [2]) == 0
