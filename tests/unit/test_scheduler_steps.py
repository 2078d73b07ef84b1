"""The scheduler step by step: prefill token budgets, prompt pieces, KV-block admission and
prefix reuse, fed fabricated outputs."""

import numpy as np
import pytest

from tritonllm.config import EngineConfig
from tritonllm.engine.scheduler import Scheduler
from tritonllm.engine.sequence import StepPlan
from tritonllm.runtimes.base import StepInput

from .engine_fakes import (
    PrefixCache,
    TokenBudget,
    run_loop,
    run_step,
    seq,
)


def test_prefill_token_budget_spreads_newcomers_over_steps():
    """max_prefill_tokens: a step prefills waiting prompts in arrival order while their tokens fit;
    without chunking the first always goes whole (a prompt longer than the budget runs alone), the
    rest wait their turn while the admitted ones decode."""
    cfg = EngineConfig(max_slots=4, max_context=256, max_tokens_limit=32, default_max_tokens=16, max_prefill_tokens=20)
    sched = Scheduler(cfg)
    long, a, b, c = seq(list(range(1, 31)), max_tokens=8), seq([1] * 12), seq([2] * 8), seq([3] * 5)
    for s in (long, a, b, c):
        sched.add(s)
    plan = sched.schedule()
    assert plan.prefill == [long] and long.step_input() == StepInput(0, long.prompt_ids, 0)  # 30 > 20: alone
    run_step(sched, plan)
    plan = sched.schedule()
    assert plan.prefill == [a, b] and plan.decode == [long]  # 12 + 8 = 20 fit, c's 5 more would not
    run_step(sched, plan)
    plan = sched.schedule()
    assert plan.prefill == [c] and plan.decode == [long, a, b]
    with pytest.raises(ValueError, match="max_prefill_tokens"):
        EngineConfig(max_prefill_tokens=8)


def test_chunked_prefill_splits_a_long_prompt_and_samples_only_its_last_piece():
    """A runtime that takes prompt pieces, a 16-token budget: a 34-token prompt prefills 14 (after
    the 2 of the prompt before it), then 16 while the other decodes, then its last 4; a 14-token
    prompt, which fits a step, waits for the next step whole rather than being split; only the last
    piece gives a token."""
    cfg = EngineConfig(max_slots=4, max_context=256, max_tokens_limit=32, default_max_tokens=16, max_prefill_tokens=16)
    sched = Scheduler(cfg, chunked=True)
    short, long = seq([9, 9], max_tokens=8), seq(list(range(1, 35)), max_tokens=8)
    mid, tiny = seq([7] * 14, max_tokens=8), seq([8, 8], max_tokens=8)
    for s in (short, long, mid, tiny):
        sched.add(s)
    plan = sched.schedule()
    assert plan.prefill == [short, long] and plan.partial == {long}
    assert long.step_input() == StepInput(1, list(range(1, 15)), 0)
    run_step(sched, plan)
    assert short.output_ids == [5] and long.output_ids == [] and long.first_token_at is None
    plan = sched.schedule()
    assert plan.prefill == [long] and plan.decode == [short] and plan.partial == {long}  # the budget is spent
    assert long.step_input() == StepInput(1, list(range(15, 31)), 14)
    run_step(sched, plan)
    plan = sched.schedule()
    assert plan.prefill == [long] and not plan.partial  # 4 + mid's 14 > 16, but 14 fits a step: mid waits
    assert long.step_input() == StepInput(1, [31, 32, 33, 34], 30)
    run_step(sched, plan, token=6)
    assert long.output_ids == [6] and long.step_input() == StepInput(1, [6], 34)
    plan = sched.schedule()
    assert plan.prefill == [mid, tiny] and plan.decode == [short, long] and not plan.partial


def test_sequences_wait_for_kv_blocks_with_free_slots_and_none_is_lost(Runtime):
    """Four slots but a pool of 25 positions: each sequence may fill 2 + 8, so two run at once;
    the others wait (counted) until one ends, then run; every one finishes with its own tokens."""
    cfg = EngineConfig(max_slots=4, max_tokens_limit=100)
    rt, budget = Runtime(slots=4), TokenBudget(25)
    rt.reserve_kv, rt.release_kv = budget.reserve_kv, budget.release_kv
    results, loop = run_loop(rt, cfg, [seq([5 * i + 1, 5 * i + 2], max_tokens=8) for i in range(5)])
    assert [r.ids for r in results] == [[5 * i + 3 + k for k in range(8)] for i in range(5)]
    assert budget.most_held == 20 and budget.held == {} and budget.free == 25
    assert loop.scheduler.kv_waits > 0 and len(rt.slots_seen) <= 4


def test_a_prompt_prefix_found_cached_does_not_count_against_the_prefill_budget():
    """Three 100-token prompts whose first 96 tokens the cache holds fit a 16-token budget in one
    step: only their 4 uncached tokens each are computed; uncached, the budget takes one a step."""

    class Cached(TokenBudget):
        def cached_prompt_tokens(self, prompt):
            return 96

    cfg = EngineConfig(max_slots=4, max_context=256, max_tokens_limit=64, max_prefill_tokens=16)
    for kv, per_step in ((Cached(10_000), 3), (TokenBudget(10_000), 1)):
        sch = Scheduler(cfg, chunked=True, kv=kv)
        for _ in range(3):
            sch.add(seq(list(range(1, 101)), max_tokens=4))
        plan = sch.schedule()
        assert len(plan.prefill) == per_step
        assert [s.chunk for s in plan.prefill] == ([100] * 3 if per_step == 3 else [16])


def test_a_burst_sharing_a_new_prefix_computes_it_once():
    """Three prompts arriving together with the same 80 uncached tokens first: the first prefills
    alone, the others wait one step and then reuse its blocks; a prompt that shares fewer than
    four blocks with it does not wait."""
    shared = list(range(1, 81))
    kv = PrefixCache()
    sch = Scheduler(EngineConfig(max_slots=4, max_context=256, max_tokens_limit=64), kv=kv)
    burst = [seq(shared + [100 + i] * 8, max_tokens=4) for i in range(3)]
    other = seq(shared[:40] + [7] * 40, max_tokens=4)
    for s in (*burst, other):
        sch.add(s)
    plan = sch.schedule()
    assert plan.prefill == [burst[0]] and sch.prefix_waits == 1
    sch.launched(plan)
    kv.register(burst[0].prompt_ids)
    plan = sch.schedule()
    assert plan.prefill == [burst[1], burst[2], other]
    assert [kv.cached_prompt_tokens(s.prompt_ids) for s in plan.prefill] == [80, 80, 32]


def test_a_newcomer_waits_for_the_piece_of_a_long_shared_prompt_computed_in_its_step():
    """Chunked prefill (96-token budget): the first prompt's second piece computes tokens 96..160
    while a newcomer sharing them finds 96 cached; it waits for them instead of computing them too."""
    shared = list(range(1, 161))
    kv = PrefixCache()
    cfg = EngineConfig(max_slots=4, max_context=512, max_tokens_limit=64, max_prefill_tokens=96)
    sch = Scheduler(cfg, chunked=True, kv=kv)
    first = seq(shared + [300], max_tokens=4)
    sch.add(first)
    plan = sch.schedule()
    sch.launched(plan)
    kv.register(first.prompt_ids[: first.prefilled])  # its first piece is cached
    late = seq(shared + [400], max_tokens=4)
    sch.add(late)
    plan = sch.schedule()
    assert plan.prefill == [first] and sch.prefix_waits == 1


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_the_inline_append_of_a_plain_row_agrees_with_append(ignore_eos):
    """update_from_output's inline path for plain rows (no log-probabilities or stop words) against
    `_append` (forced for a twin): the same ids, finish reasons and kept-token count, over random
    tokens with EOS among them, across the max_tokens and context limits."""
    cfg = EngineConfig(max_slots=8, max_context=40, max_tokens_limit=39, default_max_tokens=16)
    runs = []
    for inline in (True, False):
        sch = Scheduler(cfg)
        seqs = [seq([1] * n, max_tokens=m, ignore_eos=ignore_eos) for n, m in ((3, 30), (20, 30), (30, 9), (5, 6))]
        for s in seqs:
            s.plain_append = inline
            sch.add(s)
        plan = sch.schedule()
        draws = np.random.default_rng(7).integers(0, 6, (40, len(seqs))).tolist()  # EOS (0) about 1 in 6
        for row in draws:
            live = [s for s in seqs if s.finish_reason is None]
            if not live:
                break
            sch.update_from_output(StepPlan([], live), [row[seqs.index(s)] for s in live])
        runs.append(([(s.output_ids, s.finish_reason) for s in seqs], sch.tokens_kept))
        assert plan.prefill == seqs
    assert runs[0] == runs[1]
    reasons = {r for _, r in runs[0][0]}
    assert reasons == ({"length"} if ignore_eos else {"stop", "length"})
    if ignore_eos:  # the context limit (20 + 20 = 40) came before max_tokens (30)
        assert len(runs[0][0][1][0]) == 20
