"""Batched sampling on the GPU (torch): the same processors and order as `sampling.sample`, one
host synchronisation per step (reading the chosen ids)."""
from __future__ import annotations

import numpy as np
import torch

NEG_INF = float("-inf")


def to_device(values, device, dtype=torch.long) -> torch.Tensor:
    """A host list as a device tensor, the copy queued on the stream from pinned memory so the host
    goes on at once (the engine loop launches step N+1 while the GPU runs step N)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


class PinnedRing:
    """Pinned host buffers handed out round-robin for the engine loop's small copies (positions
    and prompt ids up, sampled ids down): a fresh pinned tensor per copy cost the H100 host's loop
    ~80 us of GIL time a step (results/server-gil-profile-h100.json). A buffer is handed out again
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


def cached_index(values: tuple[int, ...], device) -> torch.Tensor:
    """A read-only device index for a tuple of ints, made once (the same rows are masked every step)."""
    key = (values, str(device))
    idx = _INDEX_CACHE.get(key)
    if idx is None:
        if len(_INDEX_CACHE) >= 512:
            _INDEX_CACHE.clear()
        idx = _INDEX_CACHE[key] = to_device(list(values), device)
    return idx


def _generator(seq, device) -> torch.Generator:
    gen = getattr(seq, "_torch_gen", None)
    if gen is None:
        gen = torch.Generator(device=device)
        gen.manual_seed(seq.params.seed if seq.params.seed is not None else int(seq.rng.integers(2**63)))
        seq._torch_gen = gen
    return gen


_NEG_INF: dict[tuple, torch.Tensor] = {}


def _neg_inf(like: torch.Tensor) -> torch.Tensor:
    """-inf on `like`'s device in its type, made once: a Python scalar as index_put_'s value is
    copied from pageable host memory, which waits for the stream."""
    key = (str(like.device), like.dtype)
    if key not in _NEG_INF:
        _NEG_INF[key] = torch.full((), NEG_INF, device=like.device, dtype=like.dtype)
    return _NEG_INF[key]


class SamplingPlan:
    """What a batch's sampling does, read from its sequences once per launch (one pass over them)
    and applied to each step's logits: EOS masking (min_tokens / ignore_eos) grouped by EOS set,
    repetition penalty and bad words where a request asks for them, and the rows that sample
    rather than take the argmax. A multi-step launch applies one plan to each of its steps (the
    scheduler keeps every row's masking fixed over the run)."""

    def __init__(self, seqs):
        self.seqs = seqs
        masked: dict[frozenset, list[int]] = {}  # rows whose EOS is masked, grouped by EOS set: one op each
        self.history_rows, self.sampled_rows = [], []
        for i, s in enumerate(seqs):
            if len(s.output_ids) + s.pending < s.eos_masked_below:  # ignore_eos, or below min_tokens
                masked.setdefault(s.stop_token_ids, []).append(i)
            if s.needs_host_history:
                self.history_rows.append(i)
            if not s.greedy:
                self.sampled_rows.append(i)
        self.masked = list(masked.items())
        self.upcast = bool(self.sampled_rows) or any(seqs[i].params.repetition_penalty != 1.0 for i in self.history_rows)

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """The chosen ids [N] as a device tensor: no host synchronisation. Logits come in the
        model's type (bf16 on the GPU, as HF computes them): greedy rows take their argmax as they
        are (the same ids as after a cast; 16 MB read instead of a 33 MB float copy at 64 rows of a
        128k vocabulary); penalties and sampling, as the CPU sampler, work in float32."""
        if logits.dtype != torch.float32 and self.upcast:
            logits = logits.float()
        self._mask(logits)
        chosen = torch.argmax(logits, dim=-1)
        for i in self.sampled_rows:
            s = self.seqs[i]
            p = s.params
            row = _filter_top_k_top_p(logits[i] / p.temperature, p.top_k, p.top_p)
            u = torch.rand(row.shape, generator=_generator(s, logits.device), device=logits.device)
            gumbel = -torch.log(-torch.log(u.clamp_(1e-20, 1.0)))
            chosen[i] = torch.argmax(row + gumbel)
        return chosen

    def _mask(self, logits: torch.Tensor) -> None:
        from ..sampling import banned_tokens

        for ids, rows in self.masked:
            columns = cached_index(tuple(sorted(ids)), logits.device)
            if len(rows) == logits.shape[0]:  # every row (ignore_eos traffic): one fill, no row index
                logits.index_fill_(1, columns, NEG_INF)
                continue
            r = cached_index(tuple(rows), logits.device)[:, None]
            logits.index_put_((r, columns[None, :]), _neg_inf(logits))
        for i in self.history_rows:
            s = self.seqs[i]
            p = s.params
            if p.repetition_penalty != 1.0:
                seen = to_device(sorted(set(s.prompt_ids + s.output_ids)), logits.device)
                vals = logits[i, seen]
                logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
            banned = banned_tokens(s.output_ids, p.bad_ids) if p.bad_ids else []
            if banned:
                logits.index_put_((to_device([i], logits.device), to_device(banned, logits.device)), _neg_inf(logits))


def _filter_top_k_top_p(row: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if 0 < top_k < row.shape[-1]:
        kth = torch.topk(row, top_k).values[-1]
        row = row.masked_fill(row < kth, NEG_INF)
    if top_p < 1.0:
        sorted_vals, order = torch.sort(row, descending=True)
        probs = torch.softmax(sorted_vals, -1)
        drop = torch.cumsum(probs, -1) - probs > top_p
        row = row.clone()
        row[order[drop]] = NEG_INF
    return row


def sample_batch(logits: torch.Tensor, seqs) -> list[int]:
    """logits [N, V] on the device -> one token id per sequence."""
    return choose(logits, seqs).tolist()


def choose(logits: torch.Tensor, seqs) -> torch.Tensor:
    """The chosen ids [N] of one step as a device tensor (`SamplingPlan.choose`)."""
    return SamplingPlan(seqs).choose(logits)
