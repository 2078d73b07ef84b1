"""GPTQ rounding (model.gptq): the same formats and scales as the nearest rounding, a smaller
output error on the inputs it was given, and inputs that never occur handled."""

import pytest
import torch

from tritonllm.model import gptq, quant


def correlated_inputs(rows: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    return torch.randn(rows, k, generator=g) @ mix


@pytest.mark.parametrize("scheme", ["int8-wo", "fp8"])
def test_gptq_keeps_the_format_and_scales_and_lowers_the_output_error(scheme):
    torch.manual_seed(0)
    w, x = torch.randn(96, 128), correlated_inputs(1000, 128, 1)
    h = (x.T @ x).double()
    q_near, s_near = quant.quantize_weight(w, scheme)
    q, s = gptq.gptq_weight(w, h, scheme, block=32)
    assert q.dtype == q_near.dtype and torch.equal(s, s_near)
    near, ours = gptq.output_error(w, q_near.float(), s_near, h), gptq.output_error(w, q.float(), s, h)
    assert ours < 0.8 * near, (ours, near)
    assert not torch.equal(q.float(), q_near.float())  # it chose other roundings


def test_an_input_that_is_always_zero_leaves_no_nan():
    torch.manual_seed(1)
    x = correlated_inputs(400, 64, 2)
    x[:, 5] = 0.0
    q, s = gptq.gptq_weight(torch.randn(32, 64), (x.T @ x).double(), "fp8")
    assert torch.isfinite(q.float()).all() and torch.isfinite(s).all()
    assert (q.float()[:, 5] == 0).all()  # a weight no input reaches is not worth a value


def test_input_hessians_sum_every_row_each_projection_saw():
    """A two-layer toy with the decoder's attribute names: X^T X of exactly what reached each one."""

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for kind in quant.PROJECTIONS:
                setattr(self, kind, torch.nn.Linear(8, 8, bias=False))

        def forward(self, x):
            for kind in quant.PROJECTIONS:
                x = getattr(self, kind)(x)
            return x

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Layer(), Layer()])

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    torch.manual_seed(2)
    model, feeds = Toy(), [(torch.randn(1, 5, 8),), (torch.randn(1, 3, 8),)]
    sums = gptq.input_hessians(model, feeds)
    assert set(sums) == {(i, k) for i in range(2) for k in quant.PROJECTIONS}
    x = torch.cat([f[0].reshape(-1, 8) for f in feeds]).double()
    torch.testing.assert_close(sums[(0, quant.PROJECTIONS[0])], x.T @ x)
    assert all(not layer.qkv_proj._forward_pre_hooks for layer in model.layers)  # hooks removed
