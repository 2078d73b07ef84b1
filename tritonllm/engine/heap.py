"""Keeping Python's cyclic garbage collector off what an engine holds for its whole life.

Each step at hundreds of streams makes thousands of short-lived containers (step inputs, token
lists, response tuples), so the collector runs several times a step, and every so often a full
pass walks every object in the process: the model's modules and parameter wrappers, the
tokenizer, imported modules, compiled kernels. Frozen (`gc.freeze`), the objects alive once the
engine is built are left out of those passes. They are never collected as cycles afterwards, so
only a process that keeps its engine until it exits freezes for good (the engine process, a
Triton model instance's stub); a benchmark freezes for a block and gives them back.

Frozen processes also collect their youngest generation less often (`YOUNG_THRESHOLD` net
allocations instead of Python's 700): a step at a thousand streams allocates several thousand
containers that die within the step, and at 700 the collector walked them several times a step
(measured: docs/decisions.md)."""

from __future__ import annotations

import contextlib
import gc

YOUNG_THRESHOLD = 20_000


def freeze_heap() -> None:
    """Collect once, move every object alive now to the collector's permanent generation, and
    collect the youngest generation every `YOUNG_THRESHOLD` net allocations."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)


@contextlib.contextmanager
def frozen_heap():
    """`freeze_heap()` for the block; after it every frozen object (any frozen before too) is
    collectable again and the collector's thresholds are as they were."""
    thresholds = gc.get_threshold()
    freeze_heap()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
