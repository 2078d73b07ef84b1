"""The device sampler (`torch_sampling.choose`, run here on the CPU) picks what the host sampler
(`sampling.sample`) picks, from float32 logits and from the bf16 logits the GPU runtime hands it."""

import numpy as np
import pytest
import torch

from tritonllm.config import SamplingParams
from tritonllm.engine.sampling import new_rng, sample
from tritonllm.engine.sequence import Sequence
from tritonllm.runtimes.torch_cuda import sampling as torch_sampling

EOS = frozenset({3})


def seq(output_ids, **params) -> Sequence:
    s = Sequence([5, 6], SamplingParams(**params), EOS, new_rng(0))
    s.output_ids = list(output_ids)
    return s


CASES = [
    dict(temperature=0.0),
    dict(temperature=0.0, ignore_eos=True),
    dict(temperature=0.0, min_tokens=4),
    dict(temperature=0.0, repetition_penalty=1.8),
    dict(temperature=0.0, bad_ids=[[7, 3], [9]]),
    dict(temperature=0.0, frequency_penalty=2.0, presence_penalty=1.5),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_device_sampler_matches_the_host_sampler(dtype):
    torch.manual_seed(0)
    rows = torch.randn(len(CASES), 12).to(dtype)
    rows[:, 3] += 4.0  # EOS the argmax unless masked
    rows[:, 9] += 3.0
    seqs = [seq([7, 1], **c) for c in CASES]
    got = torch_sampling.choose(rows.clone(), seqs).tolist()
    assert torch_sampling.choose(rows[:3].clone(), seqs[:3]).tolist() == got[:3]  # greedy only: stays in `dtype`
    want = [
        sample(r.float().numpy(), s.params, s.prompt_ids + s.output_ids, len(s.output_ids), EOS, s.rng)
        for r, s in zip(rows, seqs)
    ]
    assert got == want
    assert got[0] == 3 and got[1] != 3 and got[2] != 3  # greedy takes EOS; ignore_eos and min_tokens mask it


def test_eos_mask_of_every_row_is_one_fill():
    rows = torch.zeros(4, 8, dtype=torch.bfloat16)
    rows[:, 3] = 5.0
    seqs = [seq([], temperature=0.0, ignore_eos=True) for _ in range(4)]
    assert torch_sampling.choose(rows, seqs).tolist() == [0, 0, 0, 0]
    assert torch.isinf(rows[:, 3]).all() and not torch.isinf(rows[:, :3]).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_device_logprobs_match_the_host_sampler(dtype):
    torch.manual_seed(1)
    rows = torch.randn(4, 40).to(dtype)
    cases = [
        dict(temperature=0.0, logprobs=True, top_logprobs=3),
        dict(temperature=0.0),  # no log-probabilities: a plain id among Sampled rows
        dict(temperature=0.0, logprobs=True, repetition_penalty=1.5),
        dict(temperature=0.7, top_p=1.0, seed=3, logprobs=True, top_logprobs=5),
    ]
    seqs = [seq([7, 1], **c) for c in cases]
    got = torch_sampling.sample_batch(rows.clone(), seqs)
    assert isinstance(got[1], int)
    for i in (0, 2, 3):
        s = seqs[i]
        want = sample(rows[i].float().numpy(), s.params, s.prompt_ids + s.output_ids, 2, EOS, s.rng)
        if s.greedy:
            assert got[i].token == want.token
        host = host_logprobs(rows[i], s)
        assert got[i].logprob == pytest.approx(host[got[i].token], abs=1e-4)
        assert got[i].top_logprobs == pytest.approx(want.top_logprobs, abs=1e-4)  # ties (bf16) in any order
        assert [host[t] for t in got[i].top_ids] == pytest.approx(got[i].top_logprobs, abs=1e-4)


def host_logprobs(row, s):
    from tritonllm.engine.sampling import processed_logits

    x = processed_logits(row.float().numpy(), s.params, s.prompt_ids + s.output_ids, 2, EOS).astype(float)
    return x - np.log(np.exp(x - x.max()).sum()) - x.max()


def test_batched_top_k_top_p_filter_matches_the_host_filter_row_by_row():
    from tritonllm.engine.sampling import top_k_top_p_filter

    torch.manual_seed(2)
    x = torch.randn(6, 50)
    params = [
        SamplingParams(temperature=1.0, top_k=k, top_p=p)
        for k, p in ((0, 0.0), (5, 0.0), (0, 0.7), (3, 0.5), (50, 1.0), (12, 0.9))
    ]
    got = torch_sampling.filter_top_k_top_p_rows(x.clone(), params)
    for row, p, out in zip(x, params, got):
        want = top_k_top_p_filter(row.numpy().copy(), p.top_k, p.top_p)
        assert np.array_equal(np.isinf(out.numpy()), np.isinf(want)), (p.top_k, p.top_p)
        assert np.allclose(out.numpy()[~np.isinf(want)], want[~np.isinf(want)])


def test_sampled_rows_follow_their_distribution_and_seeded_rows_ignore_their_batch():
    """Unseeded rows share one batched draw; over many steps each row's ids follow softmax(logits /
    T) within its top_k. A seeded row draws the same ids alone or beside others."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]]))

    def decoding(**params) -> Sequence:  # past its prompt: a row that samples
        s = seq([], **params)
        s.prefilled = s.n_prefill
        return s

    hot, topk = decoding(temperature=1.0, top_p=1.0), decoding(temperature=1.0, top_k=2)  # top_p 1: no filter
    counts = np.zeros((2, 4))
    for _ in range(3000):
        ids = torch_sampling.choose(logits.clone(), [hot, topk]).tolist()
        counts[0, ids[0]] += 1
        counts[1, ids[1]] += 1
    assert np.abs(counts[0] / 3000 - [0.5, 0.3, 0.15, 0.05]).max() < 0.04
    assert counts[1, :2].sum() == 0  # top_k=2 keeps ids 2 and 3 only
    assert abs(counts[1, 3] / 3000 - 0.4 / 0.7) < 0.04

    def seeded_ids(with_others: bool) -> list[int]:
        s = decoding(temperature=1.0, top_p=1.0, seed=11)
        batch = [decoding(temperature=0.7, top_p=1.0), s, decoding(temperature=0.0)] if with_others else [s]
        rows = logits[[0, 0, 1]] if with_others else logits[[0]]
        return [torch_sampling.choose(rows.clone(), batch).tolist()[batch.index(s)] for _ in range(20)]

    assert seeded_ids(True) == seeded_ids(False)


def test_sampled_rows_drawn_in_chunks_give_the_same_seeded_ids(monkeypatch):
    logits = torch.randn(5, 30, generator=torch.Generator().manual_seed(4))

    def ids() -> list[int]:
        seqs = []
        for i in range(5):
            s = seq([], temperature=0.9, top_k=10 + i, seed=100 + i)
            s.prefilled = s.n_prefill
            seqs.append(s)
        return [torch_sampling.choose(logits.clone(), seqs).tolist() for _ in range(4)]

    whole = ids()
    monkeypatch.setattr(torch_sampling, "DRAW_ROWS", 2)  # chunks of 2, 2 and 1 rows
    assert ids() == whole


def test_a_plan_notes_each_row_where_its_request_asks():
    """Rows of every kind in one batch: EOS masked for ignore_eos and below min_tokens (not past
    it), grouped by EOS set; history rows for penalties and bad words; sampled rows, except a prompt
    piece that does not end its prompt; log-probability rows."""
    other_eos = frozenset({4, 5})
    rows = [
        seq([], temperature=0.0),  # 0: nothing to do
        seq([1, 2], temperature=0.0, ignore_eos=True),  # 1: masked
        seq([1], temperature=0.0, min_tokens=4),  # 2: masked (1 of 4)
        seq([1, 2, 3, 4], temperature=0.0, min_tokens=4),  # 3: past min_tokens
        seq([], temperature=0.0, repetition_penalty=1.2),  # 4: history
        seq([], temperature=0.7, top_k=5),  # 5: sampled
        seq([], temperature=0.7),  # 6: sampled, but a piece mid-prompt
        seq([], temperature=0.0, logprobs=True, top_logprobs=3),  # 7: log-probabilities
        Sequence([5, 6], SamplingParams(temperature=0.0, ignore_eos=True), other_eos, new_rng(0)),  # 8
        seq([], temperature=0.0, bad_ids=[[9]], ignore_eos=True),  # 9: masked, history
    ]
    rows[2].pending = 2  # 1 generated + 2 on the way: still below 4
    rows[5].prefilled = rows[5].n_prefill  # decoding
    rows[6].n_prefill, rows[6].prefilled, rows[6].chunk = 40, 0, 16
    plan = torch_sampling.SamplingPlan(rows)
    assert sorted((sorted(ids), got) for ids, got in plan.masked) == [([3], [1, 2, 9]), ([4, 5], [8])]
    assert plan.history_rows == [4, 9] and plan.sampled_rows == [5] and plan.logprob_rows == [7]
    assert plan.top_logprobs == 3 and plan.upcast
    rows[2].pending = 3  # 1 + 3 reaches min_tokens: no longer masked
    assert [got for _, got in torch_sampling.SamplingPlan(rows[:4]).masked] == [[1]]
    assert torch_sampling.SamplingPlan(rows[:1]).masked == [] and not torch_sampling.SamplingPlan(rows[:1]).upcast
