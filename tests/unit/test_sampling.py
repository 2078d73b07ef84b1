import numpy as np
import pytest

from tritonllm.config import SamplingParams
from tritonllm.engine.sampling import banned_tokens, new_rng, sample, top_k_top_p_filter


def logits(*vals):
    return np.array(vals, dtype=np.float32)


def test_greedy_is_argmax():
    assert sample(logits(0.1, 3.0, 2.0), SamplingParams(temperature=0.0), [], 0, frozenset(), new_rng(0)) == 1


def test_top_k_one_is_greedy_even_with_temperature():
    assert sample(logits(0.1, 3.0, 2.0), SamplingParams(temperature=5.0, top_k=1), [], 0, frozenset(), new_rng(0)) == 1


def test_min_tokens_masks_eos_until_reached():
    p = SamplingParams(temperature=0.0, min_tokens=2)
    row = logits(0.0, 10.0, 1.0)  # token 1 is EOS and the argmax
    assert sample(row, p, [], 0, frozenset({1}), new_rng(0)) == 2
    assert sample(row, p, [], 2, frozenset({1}), new_rng(0)) == 1


def test_ignore_eos_masks_eos():
    p = SamplingParams(temperature=0.0, ignore_eos=True)
    assert sample(logits(0.0, 10.0, 1.0), p, [], 5, frozenset({1}), new_rng(0)) == 2


def test_repetition_penalty_matches_hf_rule():
    p = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    # token 0 (seen, positive 3.0 -> 1.5) loses to token 1 (2.0); negative seen logits are multiplied
    assert sample(logits(3.0, 2.0, -1.0), p, [0, 2], 0, frozenset(), new_rng(0)) == 1


def test_top_p_keeps_smallest_prefix_reaching_mass():
    row = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    kept = np.isfinite(top_k_top_p_filter(row, 0, 0.7))
    assert kept.tolist() == [True, True, False, False]
    kept = np.isfinite(top_k_top_p_filter(row, 0, 0.5))
    assert kept.tolist() == [True, False, False, False]


def test_top_k_filter():
    kept = np.isfinite(top_k_top_p_filter(logits(1, 5, 3, 4), 2, 1.0))
    assert kept.tolist() == [False, True, False, True]


def test_same_seed_same_draws_and_different_seed_differs():
    row = np.zeros(1000, dtype=np.float32)
    p = SamplingParams(temperature=1.0, top_p=1.0)
    draws = lambda seed: [sample(row, p, [], 0, frozenset(), r) for r in [new_rng(seed)] for _ in range(20)]
    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_sampling_follows_distribution():
    row = np.log(np.array([0.7, 0.2, 0.1], dtype=np.float32))
    rng = new_rng(1)
    p = SamplingParams(top_p=1.0)
    counts = np.bincount([sample(row, p, [], 0, frozenset(), rng) for _ in range(3000)], minlength=3)
    assert counts / 3000 == pytest.approx([0.7, 0.2, 0.1], abs=0.03)


def test_bad_words_single_and_multi_token():
    assert banned_tokens([5, 6], [[9]]) == [9]
    assert banned_tokens([5, 6], [[6, 9]]) == [9]
    assert banned_tokens([5, 7], [[6, 9]]) == []
    p = SamplingParams(temperature=0.0, bad_ids=[[1]])
    assert sample(logits(0.0, 10.0, 1.0), p, [], 0, frozenset(), new_rng(0)) == 2


def test_frequency_and_presence_penalties_follow_openais_rule():
    """logit[t] -= frequency x count(t in output) + presence x [t in output]; the prompt is not
    counted (OpenAI and vLLM penalise what the model generated)."""
    from tritonllm.engine.sampling import apply_output_penalties

    logits = np.array([5.0, 4.0, 3.0, 0.0], dtype=np.float32)
    apply_output_penalties(logits, [0, 0, 1], frequency=0.5, presence=1.0)
    np.testing.assert_allclose(logits, [5.0 - 1.0 - 1.0, 4.0 - 0.5 - 1.0, 3.0, 0.0])
    params = SamplingParams(temperature=0.0, frequency_penalty=2.0)
    row = np.array([5.0, 4.0, 3.0, 0.0], dtype=np.float32)
    assert sample(row, params, [0, 0, 9], 0, frozenset(), new_rng(0)) == 0  # prompt tokens: no penalty
    assert sample(row, params, [9, 0], 1, frozenset(), new_rng(0)) == 1  # 0 was generated once: 5 - 2 < 4


@pytest.mark.parametrize(
    "kw,greedy",
    [
        (dict(), True),  # TensorRT-LLM: no top_k and no top_p is greedy ...
        (dict(temperature=1.5), True),  # ... whatever the temperature
        (dict(top_p=0.0, top_k=0), True),
        (dict(top_p=1.0), False),  # the whole distribution
        (dict(top_k=40), False),
        (dict(top_p=0.9, temperature=0.0), True),
    ],
)
def test_trtllm_default_semantics(kw, greedy):
    assert SamplingParams(**kw).greedy is greedy
    row = np.zeros(50, dtype=np.float32)
    row[7] = 1.0
    picks = {sample(row, SamplingParams(**kw), [], 0, frozenset(), new_rng(s)) for s in range(20)}
    assert (picks == {7}) is greedy


def test_logprobs_are_the_processed_log_softmax_and_top_k_is_sorted():
    rng = np.random.default_rng(0)
    row = rng.normal(size=64).astype(np.float32)
    p = SamplingParams(temperature=0.0, logprobs=True, top_logprobs=5)
    got = sample(row, p, [], 0, frozenset(), new_rng(0))
    ref = row.astype(np.float64) - np.log(np.exp(row.astype(np.float64)).sum())
    assert got.token == int(np.argmax(row)) and got.logprob == pytest.approx(ref[got.token], abs=1e-6)
    assert got.top_ids == np.argsort(-ref)[:5].tolist() and got.top_logprobs == pytest.approx(np.sort(ref)[::-1][:5])
    hot = SamplingParams(temperature=2.0, top_p=1.0, logprobs=True)  # temperature applies first
    got = sample(row, hot, [], 0, frozenset(), new_rng(1))
    scaled = row.astype(np.float64) / 2.0
    assert got.logprob == pytest.approx(scaled[got.token] - np.log(np.exp(scaled).sum()), abs=1e-6)
    assert got.top_ids == [] and got.top_logprobs == []
    masked = SamplingParams(temperature=0.0, logprobs=True, bad_ids=[[int(np.argmax(row))]])
    got = sample(row, masked, [], 0, frozenset(), new_rng(0))
    assert got.token != int(np.argmax(row)) and got.logprob > ref[got.token]  # renormalised without the banned id
