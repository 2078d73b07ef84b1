"""Host <-> device copies of the engine loop's small per-step data (positions and prompt ids up,
sampled ids down), queued on the stream from pinned memory so the host goes on at once: the loop
launches step N+1 while the GPU runs step N."""

from __future__ import annotations

import numpy as np
import torch


def to_device(values, device, dtype=torch.long) -> torch.Tensor:
    """A host list as a device tensor, the copy queued on the stream from pinned memory so the host
    goes on at once (the engine loop launches step N+1 while the GPU runs step N)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


class PinnedRing:
    """Pinned host buffers handed out round-robin for the engine loop's small copies (positions
    and prompt ids up, sampled ids down): a fresh pinned tensor per copy costs the loop's GIL time
    every step (docs/decisions.md). A buffer is handed out again
    only after the event behind its last copy completed; the caller keeps fewer than `depth`
    copies whose host side is still to be read (the engine loop has at most launch_ahead + 1 steps
    in flight). `timed` fences can be timed against other events (CUDA events with timing)."""

    def __init__(self, numel: int, dtype=torch.long, depth: int = 4, timed: bool = False):
        self.numel, self.dtype, self.timed = numel, dtype, timed
        self._buffers = [torch.empty(numel, dtype=dtype, pin_memory=True) for _ in range(depth)]
        self._events: list[torch.cuda.Event | None] = [None] * depth
        self._next = 0

    def take(self, n: int) -> tuple[torch.Tensor, int]:
        """A pinned buffer of n elements and its index (for `fence`)."""
        i = self._next
        self._next = (i + 1) % len(self._buffers)
        if self._events[i] is not None:
            self._events[i].synchronize()
        return self._buffers[i][:n], i

    def fence(self, i: int) -> torch.cuda.Event:
        """Record that buffer i is in use by the copies enqueued so far; returns that event."""
        done = torch.cuda.Event(enable_timing=self.timed)
        done.record()
        self._events[i] = done
        return done


class StepDownloads:
    """Each launched step's chosen ids down to the host through a pinned ring, behind one CUDA event
    per step; also times the device's idle gap before a step launched while an older one was still
    uncollected (the host was late: overhead the overlap did not hide)."""

    def __init__(self, numel: int, depth: int = 8):
        self.ring = PinnedRing(numel, depth=depth, timed=True)  # depth > the loop's launch_ahead + 1
        self.idle_s = 0.0
        self._last_done: torch.cuda.Event | None = None
        self._uncollected = 0

    def mark_start(self) -> torch.cuda.Event | None:
        """Record where a step starts on the stream, if an older step may still be running."""
        if not self._uncollected:
            return None
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        return start

    def send(self, ids: torch.Tensor, start: torch.cuda.Event | None) -> tuple:
        host, i = self.ring.take(ids.numel())
        host.copy_(ids, non_blocking=True)
        done = self.ring.fence(i)
        gap = (self._last_done, start) if start is not None else None
        self._last_done = done
        self._uncollected += 1
        return host, done, gap

    def receive(self, handle: tuple) -> torch.Tensor:
        """The host copy of a sent step's ids, once that step is done."""
        host, done, gap = handle
        self._uncollected -= 1
        done.synchronize()
        if gap is not None:
            self.idle_s += gap[0].elapsed_time(gap[1]) / 1e3
        return host


def copy_to(dst: torch.Tensor, values, ring: PinnedRing | None = None) -> None:
    """Fill a preallocated device tensor from a host list (nested for 2-D), queued like
    `to_device` (no device-side temporary, no second copy), through `ring` where it is big enough."""
    if dst.device.type != "cuda":
        dst.copy_(torch.tensor(values, dtype=dst.dtype))
    elif ring is None or dst.numel() > ring.numel or dst.dtype != ring.dtype:
        dst.copy_(torch.tensor(values, dtype=dst.dtype, pin_memory=True), non_blocking=True)
    else:
        buf, i = ring.take(dst.numel())
        buf.numpy()[:] = np.asarray(values).reshape(-1)
        dst.copy_(buf.view(dst.shape), non_blocking=True)
        ring.fence(i)


_INDEX_CACHE: dict[tuple, torch.Tensor] = {}


def cached_index(values: tuple, device, dtype=torch.long) -> torch.Tensor:
    """A read-only device tensor of a tuple of numbers (an index of rows, by default), made once (the
    same rows are masked every step)."""
    key = (values, str(device), dtype)
    idx = _INDEX_CACHE.get(key)
    if idx is None:
        if len(_INDEX_CACHE) >= 512:
            _INDEX_CACHE.clear()
        idx = _INDEX_CACHE[key] = to_device(list(values), device, dtype)
    return idx
