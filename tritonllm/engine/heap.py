"""Keeping Python's cyclic garbage collector off what an engine holds for its whole life.

Each step at hundreds of streams makes thousands of short-lived containers (step inputs, token
lists, response tuples), so the collector runs several times a step, and every so often a full
pass walks every object in the process: the model's modules and parameter wrappers, the
tokenizer, imported modules, compiled kernels. Frozen (`gc.freeze`), the objects alive once the
engine is built are left out of those passes. They are never collected as cycles afterwards, so
only a process that keeps its engine until it exits freezes for good (the engine process, a
Triton model instance's stub); a benchmark freezes for a block and gives them back."""

from __future__ import annotations

import contextlib
import gc


def freeze_heap() -> None:
    """Collect once, then move every object alive now to the collector's permanent generation."""
    gc.collect()
    gc.freeze()


@contextlib.contextmanager
def frozen_heap():
    """`freeze_heap()` for the block; after it every frozen object (any frozen before too) is collectable again."""
    freeze_heap()
    try:
        yield
    finally:
        gc.unfreeze()
