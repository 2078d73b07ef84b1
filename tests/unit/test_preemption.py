"""kv_policy max-utilization: sequences are admitted with blocks for their prompt and grow step by
step; when the pool runs out the youngest running sequence gives its blocks back and is recomputed
later (its prompt and generated ids prefilled again), never lost, never sent a token twice."""

from tritonllm.config import EngineConfig
from tritonllm.engine.scheduler import Scheduler
from tritonllm.runtimes.base import RuntimeStats

from .engine_fakes import (
    CountingRuntime,
    TokenBudget,
    run_loop,
    seq,
)

MAX_UTILIZATION = dict(kv_policy="max-utilization")


def test_the_youngest_sequence_is_preempted_and_recomputed_with_its_generated_ids():
    """A pool of 12 positions, two sequences of 2-token prompts: each is admitted with room for its
    prompt and one launch; at the step where the older one cannot grow, the younger gives its
    blocks back, goes first in line with its ids kept, and comes back as a 2 + n token prefill."""
    cfg = EngineConfig(max_slots=2, max_tokens_limit=100, **MAX_UTILIZATION)
    kv = TokenBudget(12)
    sch = Scheduler(cfg, kv=kv)
    old, young = seq([1, 2], max_tokens=20), seq([7, 8], max_tokens=20)
    sch.add(old)
    sch.add(young)
    token = {old: 3, young: 9}
    for _ in range(20):
        plan = sch.schedule()
        if young not in sch.running:
            break
        sch.launched(plan)
        sch.update_from_output(plan, [token[s] + len(s.output_ids) for s in plan.sequences])
    assert sch.preemptions == 1 and young.preemptions == 1
    assert sch.waiting[0] is young and young.slot is None and young.output_ids
    assert kv.held == {old.slot: old.kv_room} and old.kv_room <= 12
    kept = list(young.output_ids)
    sch.finish(old, "cancelled")  # the pool empties: the young one is readmitted at once
    plan = sch.schedule()
    assert plan.prefill == [young] and young.n_prefill == 2 + len(kept)
    assert young.step_input().tokens == [7, 8, *kept] and young.output_ids == kept


def test_a_preempted_sequence_waits_for_its_token_in_flight():
    """Preempted while a launched step still holds its next token: it is not readmitted before that
    token arrives (its recomputation must include it)."""
    cfg = EngineConfig(max_slots=2, max_tokens_limit=100, **MAX_UTILIZATION)
    sch = Scheduler(cfg, kv=TokenBudget(100))
    s = seq([1, 2], max_tokens=8)
    sch.add(s)
    plan = sch.schedule()
    sch.launched(plan)  # its first token is on its way
    sch._preempt(s)
    assert not sch.schedule()  # nothing to run: it waits for the token
    sch.update_from_output(plan, [3])
    assert s.output_ids == [3] and sch.schedule().prefill == [s] and s.n_prefill == 3


def test_every_sequence_finishes_with_its_own_ids_when_the_pool_is_oversubscribed(Runtime):
    """Eight sequences over four slots and a pool of 40 positions, each reaching 2 + 14: the pool
    runs out mid-generation again and again; every sequence still ends with exactly its ids and
    every position goes back to the pool."""
    cfg = EngineConfig(max_slots=4, max_tokens_limit=100, **MAX_UTILIZATION)
    rt, budget = Runtime(slots=4), TokenBudget(40)
    rt.reserve_kv, rt.release_kv = budget.reserve_kv, budget.release_kv
    results, loop = run_loop(rt, cfg, [seq([5 * i + 1, 5 * i + 2], max_tokens=14) for i in range(8)])
    assert [r.ids for r in results] == [[(5 * i + 2 + k) % 49 + 1 for k in range(14)] for i in range(8)]
    assert loop.scheduler.preemptions > 0 and loop.stats.kv_preemptions == loop.scheduler.preemptions
    assert budget.held == {} and budget.free == 40 and budget.most_held <= 40


def test_guaranteed_no_evict_never_preempts(Runtime):
    cfg = EngineConfig(max_slots=4, max_tokens_limit=100)
    rt, budget = Runtime(slots=4), TokenBudget(40)
    rt.reserve_kv, rt.release_kv = budget.reserve_kv, budget.release_kv
    results, loop = run_loop(rt, cfg, [seq([5 * i + 1, 5 * i + 2], max_tokens=14) for i in range(8)])
    assert [len(r.ids) for r in results] == [14] * 8
    assert loop.scheduler.preemptions == 0 and budget.most_held <= 2 * 16


def test_the_runtimes_counters_reach_the_engines_stats():
    """What the runtime counts of its own work (here a kernel compiled after start-up, a stall)
    reaches the engine's stats, which /metrics exports."""

    class Compiling(CountingRuntime):
        def stats(self) -> RuntimeStats:
            return RuntimeStats(gpu_idle_s=0.5, kernel_compiles=3)

    _, loop = run_loop(Compiling(), EngineConfig(max_slots=2, max_tokens_limit=100), [seq([5], max_tokens=3)])
    assert loop.stats.kernel_compiles == 3 and loop.stats.gpu_idle_s == 0.5
