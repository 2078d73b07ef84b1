"""Log-probabilities of a decode step's rows in two kernel launches (OpenAI Triton).

With torch ops, the chosen token's log-probability and the top k of rows of a 128k vocabulary
took some 36 kernel launches and a full float copy of the logits per step (`torch.logsumexp`
guards infinities op by op, `torch.topk` runs a multi-pass radix select): more host time than the
rest of the step's sampling (docs/decisions.md). Here one program per (row, vocabulary chunk)
reads its chunk once and leaves the chunk's max, its sum of exp(x - max), the chosen token's
logit if the chunk holds it, and the chunk's top k; one program per row then combines the chunks:
log-sum-exp, the chosen log-probability and the top k of the candidates."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...config import MAX_TOP_LOGPROBS

CHUNK = 4096  # vocabulary entries per program of the first kernel


@triton.jit(do_not_specialize=["K"])  # one compiled kernel for every top_logprobs (a 1 would be its own)
def _chunk_kernel(logits, stride, rows, temps, chosen, maxes, sums, picked, cand_v, cand_i, V, K, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    c = tl.program_id(1)
    nc = tl.num_programs(1)
    row = tl.load(rows + i)
    offs = c * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(logits + row * stride + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    x = x / tl.load(temps + i)
    m = tl.max(x, 0)
    safe = tl.where(m == float("-inf"), 0.0, m)  # an all-masked chunk adds nothing
    tl.store(maxes + i * nc + c, m)
    tl.store(sums + i * nc + c, tl.sum(tl.exp(x - safe), 0))
    tl.store(picked + i * nc + c, tl.sum(tl.where(offs == tl.load(chosen + i), x, 0.0), 0))
    for j in range(K):
        best = tl.argmax(x, 0)
        tl.store(cand_v + (i * nc + c) * K + j, tl.max(x, 0))
        tl.store(cand_i + (i * nc + c) * K + j, c * BLOCK + best)
        x = tl.where(tl.arange(0, BLOCK) == best, float("-inf"), x)


@triton.jit(do_not_specialize=["K"])
def _row_kernel(maxes, sums, picked, cand_v, cand_i, out_v, out_i, NC, K, CB: tl.constexpr, KB: tl.constexpr):
    i = tl.program_id(0)
    cs = tl.arange(0, CB)
    m = tl.load(maxes + i * NC + cs, mask=cs < NC, other=float("-inf"))
    top = tl.max(m, 0)
    s = tl.load(sums + i * NC + cs, mask=cs < NC, other=0.0)
    lse = top + tl.log(tl.sum(s * tl.exp(m - top), 0))
    tl.store(out_v + i * (K + 1), tl.sum(tl.load(picked + i * NC + cs, mask=cs < NC, other=0.0), 0) - lse)
    ks = tl.arange(0, KB)
    v = tl.load(cand_v + i * NC * K + ks, mask=ks < NC * K, other=float("-inf"))
    ids = tl.load(cand_i + i * NC * K + ks, mask=ks < NC * K, other=0)
    for j in range(K):
        best = tl.argmax(v, 0)
        tl.store(out_v + i * (K + 1) + 1 + j, tl.max(v, 0) - lse)
        tl.store(out_i + i * K + j, tl.sum(tl.where(ks == best, ids, 0), 0))
        v = tl.where(ks == best, float("-inf"), v)


def warm_up(vocab: int, device) -> None:
    """Compile both kernels for this vocabulary now, not in a request's step (a first compile takes
    about a second; the kernels' shapes depend on the vocabulary only)."""
    logits = torch.zeros((1, vocab), dtype=torch.float32, device=device)
    one = torch.ones(1, dtype=torch.float32, device=device)
    zero = torch.zeros(1, dtype=torch.int64, device=device)
    logprob_stats(logits, zero, one, zero, 1)


def logprob_stats(
    logits: torch.Tensor, rows: torch.Tensor, temps: torch.Tensor, chosen: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """For the logits rows `rows` (each divided by its temperature in `temps`): [n, 1 + k] float32
    log-probabilities, the `chosen` token's then the k most likely, and [n, k] their ids."""
    n, v = len(rows), logits.shape[-1]
    nc = triton.cdiv(v, CHUNK)
    dev = logits.device
    maxes, sums, picked = (torch.empty((n, nc), dtype=torch.float32, device=dev) for _ in range(3))
    cand_v = torch.empty((n, nc, max(k, 1)), dtype=torch.float32, device=dev)
    cand_i = torch.empty((n, nc, max(k, 1)), dtype=torch.int64, device=dev)
    _chunk_kernel[(n, nc)](
        logits, logits.stride(0), rows, temps, chosen, maxes, sums, picked, cand_v, cand_i, v, k, BLOCK=CHUNK
    )
    out_v = torch.empty((n, 1 + k), dtype=torch.float32, device=dev)
    out_i = torch.empty((n, k), dtype=torch.int64, device=dev)
    # block sizes from the vocabulary alone (not k): one compiled kernel per model
    cb, kb = triton.next_power_of_2(nc), triton.next_power_of_2(nc * MAX_TOP_LOGPROBS)
    _row_kernel[(n,)](maxes, sums, picked, cand_v, cand_i, out_v, out_i, nc, k, CB=cb, KB=kb)
    return out_v, out_i
