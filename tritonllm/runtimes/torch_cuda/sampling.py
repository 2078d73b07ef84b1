"""Batched sampling on the device (torch): the same processors and order as the host sampler
(`tritonllm.engine.sampling.sample`), one host synchronisation per step (reading the chosen ids)."""

from __future__ import annotations

import logging

import torch

from ..base import Sampled
from .transfers import cached_index, to_device

log = logging.getLogger(__name__)
NEG_INF = float("-inf")


def _generator(seq, device) -> torch.Generator:
    if seq.device_rng is None:
        gen = torch.Generator(device=device)
        gen.manual_seed(seq.params.seed if seq.params.seed is not None else int(seq.rng.integers(2**63)))
        seq.device_rng = gen
    return seq.device_rng


_NEG_INF: dict[tuple, torch.Tensor] = {}
DRAW_ROWS = 256  # sampled rows drawn together: a batch's float temporaries (a sort's too) stay near a
# gigabyte at a 128k vocabulary, beside a KV pool sized from the memory free at start-up


def _neg_inf(like: torch.Tensor) -> torch.Tensor:
    """-inf on `like`'s device in its type, made once: a Python scalar as index_put_'s value is
    copied from pageable host memory, which waits for the stream."""
    key = (str(like.device), like.dtype)
    if key not in _NEG_INF:
        _NEG_INF[key] = torch.full((), NEG_INF, device=like.device, dtype=like.dtype)
    return _NEG_INF[key]


def _ends_prompt(s) -> bool:
    return s.prefilled + s.chunk >= s.n_prefill


def _by_stop_ids(seqs, rows: list[int]) -> list[tuple[frozenset, list[int]]]:
    """The rows grouped by their EOS set (one masking op each): mostly a single set for all."""
    ids = [seqs[i].stop_token_ids for i in rows]
    if not ids:
        return []
    if ids.count(ids[0]) == len(ids):
        return [(ids[0], rows)]
    groups: dict[frozenset, list[int]] = {}
    for i, eos in zip(rows, ids):
        groups.setdefault(eos, []).append(i)
    return list(groups.items())


class SamplingPlan:
    """What a batch's sampling does, read from its sequences once per launch (one pass over them)
    and applied to each step's logits: EOS masking (min_tokens / ignore_eos) grouped by EOS set,
    repetition penalty and bad words where a request asks for them, and the rows that sample
    rather than take the argmax. A multi-step launch applies one plan to each of its steps (the
    scheduler keeps every row's masking fixed over the run)."""

    def __init__(self, seqs):
        self.seqs = seqs
        # list comprehensions over every row, the per-row work only where a row asks for it: at a
        # thousand rows a step this pass is host time of every launch
        masked = [
            i
            for i, s in enumerate(seqs)
            if s.eos_always_masked or (s.eos_masked_below and len(s.output_ids) + s.pending < s.eos_masked_below)
        ]
        other = [i for i, s in enumerate(seqs) if not s.plain_sampling]  # greedy, no processors: nothing more
        self.history_rows = [i for i in other if seqs[i].needs_host_history]
        # a prompt piece draws nothing: a seeded request samples the same however its prompt was split
        self.sampled_rows = [i for i in other if not seqs[i].greedy and _ends_prompt(seqs[i])]
        self.logprob_rows = [i for i in other if seqs[i].params.logprobs]
        self.masked = _by_stop_ids(seqs, masked)
        self.top_logprobs = max((seqs[i].params.top_logprobs for i in self.logprob_rows), default=0)
        self.upcast = bool(self.sampled_rows) or any(
            seqs[i].params.repetition_penalty != 1.0 or seqs[i].params.has_output_penalties for i in self.history_rows
        )

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """The chosen ids [N] as a device tensor: no host synchronisation. Logits come in the
        model's type (bf16 on the GPU, as HF computes them): greedy rows take their argmax as they
        are (the same ids as after a cast; 16 MB read instead of a 33 MB float copy at 64 rows of a
        128k vocabulary); penalties and sampling, as the CPU sampler, work in float32."""
        if logits.dtype != torch.float32 and self.upcast:
            logits = logits.float()
        self._mask(logits)
        self.processed = logits  # masked and penalised (`logprobs` reads it)
        chosen = torch.argmax(logits, dim=-1)
        for first in range(0, len(self.sampled_rows), DRAW_ROWS):
            self._draw(logits, chosen, self.sampled_rows[first : first + DRAW_ROWS])
        return chosen

    def _draw(self, logits: torch.Tensor, chosen: torch.Tensor, sampled: list[int]) -> None:
        """The ids of these sampled rows (Gumbel-max over the filtered, temperature-scaled logits)
        in one batch of device ops: at hundreds of sampling streams a few ops per row would be
        thousands of launches a step. The noise of a row with a seed comes from its own generator
        (its ids do not depend on what it is batched with); the rows without one share one draw
        from the device's default generator."""
        device, params = logits.device, [self.seqs[i].params for i in sampled]
        rows = to_device(sampled, device)
        temps = to_device([p.temperature for p in params], device, torch.float32)
        x = filter_top_k_top_p_rows(logits.index_select(0, rows) / temps[:, None], params)
        u = self._noise(x, params, sampled)
        gumbel = -torch.log(-torch.log(u.clamp_(1e-20, 1.0)))
        chosen[rows] = torch.argmax(x + gumbel, dim=-1)

    def _noise(self, x: torch.Tensor, params: list, sampled: list[int]) -> torch.Tensor:
        """Uniform noise like x: one draw for the rows without a seed, a row from its own
        generator for each row with one."""
        seeded = [j for j, p in enumerate(params) if p.seed is not None]
        if not seeded:
            return torch.rand(x.shape, device=x.device)
        u = torch.empty_like(x)
        drawn = [j for j, p in enumerate(params) if p.seed is None]
        if drawn:
            u[to_device(drawn, x.device)] = torch.rand((len(drawn), x.shape[1]), device=x.device)
        for j in seeded:
            gen = _generator(self.seqs[sampled[j]], x.device)
            u[j] = torch.rand(x.shape[1:], generator=gen, device=x.device)
        return u

    def logprobs(self, chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For the rows that ask for them (after `choose`): [n, 1 + k] float32 log-
        probabilities (the chosen token's, then the k most likely) and [n, k] ids, k the largest
        `top_logprobs` among them; temperature applied as the sampler applies it."""
        logits = self.processed
        every = len(self.logprob_rows) == len(self.seqs)
        rows = cached_index(tuple(self.logprob_rows), logits.device)
        picked_ids = chosen if every else chosen.index_select(0, rows)
        temps = tuple(1.0 if self.seqs[i].greedy else self.seqs[i].params.temperature for i in self.logprob_rows)
        temps_t = cached_index(temps, logits.device, torch.float32)
        if logits.is_cuda and _kernels() is not None:
            return _kernels().logprob_stats(logits, rows, temps_t, picked_ids, self.top_logprobs)
        x = (logits if every else logits.index_select(0, rows)).float()
        if any(t != 1.0 for t in temps):
            x = x / temps_t[:, None]
        lse = torch.logsumexp(x, dim=-1, keepdim=True)  # read where needed, no [rows, vocab] log-softmax
        picked = x.gather(1, picked_ids[:, None]) - lse
        if not self.top_logprobs:
            return picked, torch.empty((len(temps), 0), dtype=torch.long, device=logits.device)
        top = torch.topk(x, self.top_logprobs, dim=-1)
        return torch.cat([picked, top.values - lse], dim=1), top.indices

    def results(self, chosen: list[int], logprobs: tuple[torch.Tensor, torch.Tensor] | None) -> list:
        """The step's ids, a `Sampled` for each row that asks for log-probabilities (`logprobs`: the
        two tensors of `logprobs()`, on the host or read from the device here)."""
        if logprobs is None:
            return chosen
        out = list(chosen)
        for i, vals, ids in zip(self.logprob_rows, *(t.tolist() for t in logprobs)):
            k = self.seqs[i].params.top_logprobs
            out[i] = Sampled(chosen[i], vals[0], ids[:k], vals[1 : 1 + k])
        return out

    def _mask(self, logits: torch.Tensor) -> None:
        from ...engine.sampling import banned_tokens

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
            if p.has_output_penalties and s.output_ids:
                ids, counts = torch.unique(torch.tensor(s.output_ids), return_counts=True)
                penalty = p.frequency_penalty * counts.float() + p.presence_penalty
                logits[i, to_device(ids.tolist(), logits.device)] -= to_device(
                    penalty.tolist(), logits.device, logits.dtype
                )
            banned = banned_tokens(s.output_ids, p.bad_ids) if p.bad_ids else []
            if banned:
                logits.index_put_((to_device([i], logits.device), to_device(banned, logits.device)), _neg_inf(logits))


def filter_top_k_top_p_rows(x: torch.Tensor, params) -> torch.Tensor:
    """Each row of x [n, vocab] filtered by its request's top_k, then top_p (the host sampler's
    `top_k_top_p_filter`, row by row): values below the row's k-th largest, then those past the
    smallest prefix of the sorted row whose probability reaches top_p, become -inf. One topk and
    one sort for the rows together, only where some row asks for each."""
    n, vocab = x.shape
    ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    if any(ks):
        k = to_device(ks, x.device)
        kth = torch.topk(x, max(ks), dim=-1).values.gather(1, (k - 1).clamp(min=0)[:, None])
        x = x.masked_fill((k > 0)[:, None] & (x < kth), NEG_INF)
    ps = [p.top_p if 0.0 < p.top_p < 1.0 else 0.0 for p in params]
    if any(ps):
        top_p = to_device(ps, x.device, torch.float32)
        sorted_vals, order = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(sorted_vals, -1)
        drop = (torch.cumsum(probs, -1) - probs > top_p[:, None]) & (top_p > 0)[:, None]
        x = x.scatter(1, order, sorted_vals.masked_fill(drop, NEG_INF))
    return x


def sample_batch(logits: torch.Tensor, seqs) -> list:
    """logits [N, V] on the device -> one token id (or `Sampled`) per sequence."""
    plan = SamplingPlan(seqs)
    chosen = plan.choose(logits)
    return plan.results(chosen.tolist(), plan.logprobs(chosen) if plan.logprob_rows else None)


def choose(logits: torch.Tensor, seqs) -> torch.Tensor:
    """The chosen ids [N] of one step as a device tensor (`SamplingPlan.choose`)."""
    return SamplingPlan(seqs).choose(logits)


_KERNELS: list = []


def warm_up_logprobs(vocab: int, device) -> None:
    """Compile the log-probability kernels at start-up (not in a request's step); where they do not
    compile, the torch ops serve."""
    kernels = _kernels()
    if kernels is None or torch.device(device).type != "cuda":
        return
    try:
        kernels.warm_up(vocab, device)
    except Exception as exc:  # a Triton that cannot build them here: the torch ops are exact too
        log.warning("log-probability kernels unavailable (%s): using the torch ops", str(exc)[:300])
        _KERNELS[:] = [None]


def _kernels():
    """The OpenAI-Triton log-probability kernels (`kernels.logprobs`), or None where Triton does not
    import (the torch ops then serve)."""
    if not _KERNELS:
        try:
            from ..kernels import logprobs
        except ImportError:
            logprobs = None
        _KERNELS.append(logprobs)
    return _KERNELS[0]
