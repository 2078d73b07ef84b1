"""The engine's frozen heap: objects alive when an engine is built leave the garbage collector's
passes (a served engine keeps them for good; a benchmark's block gives them back)."""

import gc

from tritonllm.engine.heap import YOUNG_THRESHOLD, frozen_heap


def test_frozen_heap_moves_live_objects_out_of_collection_and_back():
    before = gc.get_freeze_count()
    kept = [[] for _ in range(10)]  # alive when the block starts: frozen with the rest
    with frozen_heap():
        assert gc.get_freeze_count() >= before + len(kept)
        cycle: list = []
        cycle.append(cycle)  # made inside the block: still collectable
        del cycle
        assert gc.collect() >= 1
    assert gc.get_freeze_count() == 0  # gc.unfreeze gives every frozen object back


def test_a_frozen_heap_collects_its_young_generation_less_often_and_restores_the_thresholds():
    before = gc.get_threshold()
    with frozen_heap():
        assert gc.get_threshold() == (YOUNG_THRESHOLD, *before[1:])
    assert gc.get_threshold() == before
