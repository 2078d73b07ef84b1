"""The small-batch `gemv` products (tiles on the CUDA cores, skinny tensor-core dots, split-K
partial sums) on ragged shapes against `linear`, and the fused kernels reading a split product's
partial sums as the product itself; run by Triton's interpreter on the CPU (fp32)."""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from tritonllm.runtimes.kernels import fused as fk
from tritonllm.runtimes.kernels import gemv


@pytest.mark.parametrize("rows,config", [(1, (8, 512, 4)), (3, (16, 512, 4)), (8, (4, 1024, 4))])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv_matches_linear_on_ragged_shapes(rows, config, with_bias):
    torch.manual_seed(3)
    n, k = 37, 300  # neither a multiple of the rows per program nor of the K step
    x, w = torch.randn(rows, 1, k), torch.randn(n, k)
    b = torch.randn(n) if with_bias else None
    torch.testing.assert_close(
        gemv.small_matmul(x, w, b, config), torch.nn.functional.linear(x, w, b), atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize(
    "rows,config",
    [(1, gemv.DOT_CONFIGS[1]), (9, gemv.DOT_CONFIGS[0]), (33, gemv.DOT_CONFIGS[2]), (64, gemv.DOT_CONFIGS[3])],
)
def test_skinny_dot_matches_linear_on_ragged_shapes(rows, config):
    torch.manual_seed(4)
    n, k = 45, 300
    x, w, b = torch.randn(rows, 1, k), torch.randn(n, k), torch.randn(n)
    torch.testing.assert_close(
        gemv.small_matmul(x, w, b, config), torch.nn.functional.linear(x, w, b), atol=1e-3, rtol=1e-3
    )


@pytest.mark.parametrize(
    "rows,config", [(1, (32, 64, 4, 4, 2)), (5, (16, 128, 4, 4, 2)), (33, (32, 64, 4, 4, 4)), (64, (64, 64, 4, 3, 8))]
)
def test_split_k_partial_sums_add_up_to_linear(rows, config):
    torch.manual_seed(5)
    n, k = 45, 300  # the last slice of the 8-way split holds no K step at all: its partials are zeros
    x, w, b = torch.randn(rows, 1, k), torch.randn(n, k), torch.randn(n)
    got = gemv.small_matmul(x, w, b, config)
    assert isinstance(got, gemv.SplitK) and got.parts.shape == (config[4], rows, n)
    torch.testing.assert_close(got.total(), torch.nn.functional.linear(x, w, b)[:, 0], atol=1e-3, rtol=1e-3)


def test_fused_kernels_read_split_partial_sums_as_the_product():
    torch.manual_seed(6)
    b, h, hkv, d = 3, 4, 2, 8
    x, cfg = torch.randn(b, 1, 40), (16, 64, 4, 4, 3)
    w_qkv, w_o, w_gu = torch.randn((h + 2 * hkv) * d, 40), torch.randn(40, 40), torch.randn(2 * 24, 40)
    ang = torch.randn(b, 1, d // 2)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    pos = torch.tensor([5, 0, 11])
    caches = [tuple(torch.zeros(4, hkv, 16, d) for _ in range(2)) for _ in range(2)]
    qs = [
        fk.rope_kv_write(y, cos, sin, *kv, torch.arange(4, dtype=torch.int32).view(4, 1), pos, h, hkv)
        for y, kv in zip([x @ w_qkv.T, gemv.small_matmul(x, w_qkv, None, cfg)], caches)
    ]
    torch.testing.assert_close(qs[1], qs[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(caches[1], caches[0], atol=1e-4, rtol=1e-4)
    res = [torch.randn(b, 1, 40)] * 2
    res = [r.clone() for r in res]
    outs = [fk.add_rms_norm(y, r, w_o[0], 1e-5) for y, r in zip([x @ w_o.T, gemv.small_matmul(x, w_o, None, cfg)], res)]
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(res[1], res[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        fk.activate_mul(gemv.small_matmul(x, w_gu, None, cfg)), fk.activate_mul(x @ w_gu.T), atol=1e-4, rtol=1e-4
    )


def test_gemv_refuses_more_rows_than_a_program_holds():
    with pytest.raises(ValueError, match="at most 8 rows"):
        gemv.small_matmul(torch.zeros(9, 16), torch.zeros(4, 16), None, gemv.CONFIGS[0])
