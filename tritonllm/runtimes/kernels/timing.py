"""Timing and checking kernel candidates at start-up (the tuners of `gemv`, `qmatmul` and
`attention`): a candidate is checked against a reference (its first run compiles it; several at
once on a GPU), then timed replayed from a CUDA graph, so Python's launch cost is not in its time."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

log = logging.getLogger(__name__)
COMPILE_THREADS = 8  # candidates checked at once at start-up: a check's first run compiles its kernel,
# most of a tuning's time, and OpenAI Triton's compiler leaves the GIL for most of that; the timings
# after the checks stay one at a time (each captures a CUDA graph)
CHECK_COPIES = 8  # float32 copies of the reference's size a check holds at once (output, its split
# partial sums, the differences), for `check_all`'s share of free memory


ATOMICS_MARGIN = 0.98  # a form whose sums' order varies run to run (atomic adds) replaces the one as tuned
# only where it takes under 98 % of its time: a closer win is within run-to-run noise, and costs
# logits that repeat bit for bit


def report_row(kind: str, rows: int, chosen, times: dict) -> dict:
    """A tuner's log and report entry: the table key's kind and rows, the choice, {form: us}."""
    return {
        "kind": kind,
        "rows": rows,
        "chosen": str(chosen),
        "us": {str(c): round(1e3 * t, 1) for c, t in times.items()},
    }


def keep_unordered(found: dict, report: list, key: str, rows: int, times: dict, label: str) -> None:
    """Records an atomic-sum form's choice at `rows`: the fastest of `times` ({form: ms}, "as
    tuned" the deterministic step) into `found` under (key, rows) where it takes under
    ATOMICS_MARGIN of "as tuned"'s time; the timings into `report` and the log."""
    best = min(times, key=times.get)
    best = best if times[best] < ATOMICS_MARGIN * times["as tuned"] else "as tuned"
    if best != "as tuned":
        found[(key, rows)] = best
    report.append(report_row(key, rows, best, times))
    log.info("%s x%d: %s (%s)", label, rows, report[-1]["chosen"], report[-1]["us"])


def capture(fn: Callable[[], object]) -> tuple[torch.cuda.CUDAGraph, object]:
    """A CUDA graph of `fn` (run once on a side stream first, so it compiles and allocates outside
    the capture) and what the captured call returned (rewritten by each replay)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def graph_ms(fn: Callable[[], object], reps: int = 5) -> float:
    """GPU milliseconds per call of `fn` replayed from a CUDA graph (Python launch cost excluded)."""
    return replay_ms(capture(fn)[0], reps)


def replay_ms(graph, reps: int = 50) -> float:
    """GPU milliseconds per replay of a captured CUDA graph (one replay first, then `reps` timed)."""
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def agrees(label: str, product: Callable[[], torch.Tensor], ref: torch.Tensor, tolerance: float = 2e-2) -> bool:
    """A candidate `product` (a thunk) equals `ref` within `tolerance` x max(|ref|, 1); one that
    does not compile on this GPU (shared memory, ...) or disagrees is logged and not a candidate."""
    ref = ref.float()
    try:
        err = (product().float().view_as(ref) - ref).abs().max().item()
    except Exception as exc:  # a tile that does not compile here: not a candidate
        log.warning("%s unavailable here (%s)", label, str(exc)[:200])
        return False
    ok = err <= tolerance * max(ref.abs().max().item(), 1.0)
    if not ok:
        log.warning("%s disagrees with the reference (max |diff| %.3g): not used", label, err)
    return ok


def check_all(checks: Sequence[Callable[[], bool]], device: torch.device, ref: torch.Tensor) -> list[bool]:
    """Each candidate's check against `ref`, whose first run compiles the candidate: on up to
    COMPILE_THREADS threads on a GPU, as many as half its free memory holds (a check makes a few
    float32 copies of an output, and the KV pool may have taken most of the memory already); one
    after another elsewhere (the CPU interpreter patches Triton's language module while it runs)."""
    threads = min(COMPILE_THREADS, len(checks)) if device.type == "cuda" else 1
    if threads > 1:
        threads = min(threads, torch.cuda.mem_get_info(device)[0] // (2 * CHECK_COPIES * 4 * ref.numel()))
    if threads <= 1:
        return [check() for check in checks]

    def on_device(check: Callable[[], bool]) -> bool:
        with torch.cuda.device(device):  # a new thread's current device is the first GPU
            return check()

    with ThreadPoolExecutor(threads, thread_name_prefix="tune") as pool:
        return list(pool.map(on_device, checks))
