"""The compile watch counts and names kernel variants compiled after start-up (each a stall of the
engine loop), not those of a runtime starting up or a manual warm-up, and keeps a hook installed
before it."""

import logging

import pytest

from tritonllm.runtimes.kernels.compile_watch import CompileWatch


def compile_event(watch: CompileWatch, warmup: bool = False):
    return watch.hook(
        key=("k",),
        repr="_decode_attention_kernel[num_warps=4](tile_row: ('*i32', 'D'))",
        fn=None,
        compile={
            "signature": {"tile_row": "*i32"},
            "constants": {"R": 64},
            "configs": [{(7,): [["tt.divisibility", 16]]}],
        },
        is_manual_warmup=warmup,
        already_compiled=False,
    )


def test_a_compile_after_start_up_is_counted_and_named(caplog):
    watch = CompileWatch()
    with watch.starting():
        compile_event(watch)  # a runtime's own start-up
    compile_event(watch, warmup=True)
    assert watch.count == 0 and not caplog.records
    with caplog.at_level(logging.WARNING):
        compile_event(watch)
    assert watch.count == 1 and "tile_row: ('*i32', 'D')" in caplog.text and "'R': 64" in caplog.text


def test_arming_installs_the_hook_once_and_chains_the_one_before():
    knobs = pytest.importorskip("triton").knobs
    seen, before = [], knobs.runtime.jit_cache_hook
    knobs.runtime.jit_cache_hook = lambda **kw: seen.append(kw["repr"])
    try:
        watch = CompileWatch()
        watch.arm()
        watch.arm()
        assert knobs.runtime.jit_cache_hook == watch.hook
        compile_event(watch)
        assert watch.count == 1 and len(seen) == 1
    finally:
        knobs.runtime.jit_cache_hook = before
