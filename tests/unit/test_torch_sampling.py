"""The device sampler (`torch_sampling.choose`, run here on the CPU) picks what the host sampler
(`sampling.sample`) picks, from float32 logits and from the bf16 logits the GPU runtime hands it."""

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
