"""Token sampling on one row of logits (numpy), in the order HF `generate` applies its processors:
repetition penalty -> frequency/presence penalties -> min_tokens/ignore_eos masking -> bad words ->
temperature -> top-k -> top-p. Log-probabilities are taken after temperature, before top-k/top-p
(vLLM's "processed" log-probabilities without its top-k/top-p step; TensorRT-LLM also applies
temperature first): with greedy requests and no penalties they are the model's log-softmax."""

from __future__ import annotations

import numpy as np

from ..config import SamplingParams
from ..runtimes.base import Sampled

NEG_INF = np.float32(-np.inf)


def new_rng(seed: int | None) -> np.random.Generator:
    """Per-request generator: the same seed gives the same draws whatever else is in the batch."""
    return np.random.Generator(np.random.PCG64(seed))


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> None:
    if penalty == 1.0 or seen.size == 0:
        return
    vals = logits[seen]
    logits[seen] = np.where(vals > 0, vals / penalty, vals * penalty)


def apply_output_penalties(logits: np.ndarray, output: list[int], frequency: float, presence: float) -> None:
    """OpenAI's rule (as vLLM applies it): each token generated so far loses `frequency` per
    occurrence and `presence` once."""
    if not output or not (frequency or presence):
        return
    ids, counts = np.unique(np.asarray(output, dtype=np.int64), return_counts=True)
    logits[ids] -= np.float32(frequency) * counts.astype(np.float32) + np.float32(presence)


def banned_tokens(output: list[int], bad_ids: list[list[int]]) -> list[int]:
    """Last tokens of bad-word sequences whose prefix the output currently ends with."""
    out = []
    for seq in bad_ids:
        prefix = seq[:-1]
        if not prefix or (len(output) >= len(prefix) and output[-len(prefix) :] == prefix):
            out.append(seq[-1])
    return out


def top_k_top_p_filter(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    if 0 < top_k < logits.shape[-1]:
        kth = np.partition(logits, -top_k)[-top_k]
        logits = np.where(logits < kth, NEG_INF, logits)
    if 0.0 < top_p < 1.0:
        order = np.argsort(-logits, kind="stable")
        probs = softmax(logits[order])
        cum = np.cumsum(probs)
        drop = cum - probs > top_p  # keep the smallest prefix whose mass reaches top_p (at least one)
        filtered = logits.copy()
        filtered[order[drop]] = NEG_INF
        logits = filtered
    return logits


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x))
    return e / e.sum()


def processed_logits(
    logits: np.ndarray, params: SamplingParams, history: list[int], n_generated: int, stop_token_ids: frozenset[int]
) -> np.ndarray:
    """The row the token is drawn from: a float32 copy after the penalties and masks, divided by the
    temperature where the request samples. `history` is prompt + output (for the repetition
    penalty), `n_generated` the tokens generated so far, `stop_token_ids` the ids that end the
    sequence (EOS / end_id)."""
    logits = np.array(logits, dtype=np.float32, copy=True)
    apply_repetition_penalty(logits, np.unique(np.asarray(history, dtype=np.int64)), params.repetition_penalty)
    output = history[len(history) - n_generated :] if n_generated else []
    apply_output_penalties(logits, output, params.frequency_penalty, params.presence_penalty)
    if stop_token_ids and (params.ignore_eos or n_generated < params.min_tokens):
        logits[list(stop_token_ids)] = NEG_INF
    if params.bad_ids:
        banned = banned_tokens(output, params.bad_ids)
        if banned:
            logits[banned] = NEG_INF
    return logits if params.greedy else logits / np.float32(params.temperature)


def pick(processed: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    if params.greedy:
        return int(np.argmax(processed))
    probs = softmax(top_k_top_p_filter(processed, params.top_k, params.top_p).astype(np.float64))
    return int(rng.choice(probs.shape[-1], p=probs))


def with_logprobs(processed: np.ndarray, token: int, k: int) -> Sampled:
    """`token` with its log-probability and the k most likely tokens' under `processed`."""
    x = processed.astype(np.float64)
    m = np.max(x)
    logp = x - (m + np.log(np.sum(np.exp(x - m))))
    top = np.argsort(-logp, kind="stable")[:k] if k else np.empty(0, dtype=np.int64)
    return Sampled(token, float(logp[token]), top.tolist(), logp[top].tolist())


def sample(
    logits: np.ndarray,
    params: SamplingParams,
    history: list[int],
    n_generated: int,
    stop_token_ids: frozenset[int],
    rng: np.random.Generator,
) -> int | Sampled:
    """The next token (a `Sampled` with its log-probabilities where the request asks for them)."""
    processed = processed_logits(logits, params, history, n_generated, stop_token_ids)
    token = pick(processed, params, rng)
    return with_logprobs(processed, token, params.top_logprobs) if params.logprobs else token
