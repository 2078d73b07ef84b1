"""bench/int8_widening.py: the integer + float add widening gives exactly the int8 values (every
one of the 256, and a gemv through both ways bit for bit in Triton's interpreter), and compiled for
sm_90 its SASS has no int-to-float conversion (I2F) while the plain way has one a value."""

import json
import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")
from bench import int8_widening as iw

from ..compiled import run_uninterpreted


def test_the_gemv_is_the_same_both_ways_and_matches_torch():
    ws = iw.weights(24, 96, "cpu")
    x = torch.randn(96, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    plain = iw.gemv(x, ws["int8"], ws["scale"], (8, 32, 1), magic=False)
    magic = iw.gemv(x, ws["int8"], ws["scale"], (8, 32, 1), magic=True)
    assert torch.equal(plain, magic)
    ref = (ws["int8"].float() @ x.float()) * ws["scale"]
    assert torch.allclose(magic, ref, rtol=1e-5, atol=1e-4)


def test_the_float8_gemv_matches_torch_with_a_ragged_edge():
    ws = iw.weights(20, 80, "cpu")  # 20 rows, 80 columns: masked tails of both tile dimensions
    x = torch.randn(80, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    y = iw.gemv(x, ws["fp8"], ws["scale"], (8, 32, 1), magic=False)
    ref = (ws["fp8"].float() @ x.float()) * ws["scale"]
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-4)


def test_every_int8_value_widens_exactly():
    w = torch.zeros(256, 16, dtype=torch.int8)
    w[:, 0] = torch.arange(-128, 128, dtype=torch.int32).to(torch.int8)  # row r holds r - 128 in column 0
    x = torch.zeros(16, dtype=torch.bfloat16)
    x[0] = 1.0
    y = iw.gemv(x, w, torch.ones(256), (8, 16, 1), magic=True)
    assert torch.equal(y, torch.arange(-128, 128, dtype=torch.float32))


SASS = r"""
import json
from bench.int8_widening import SASS_WEIGHTS, sass_per_value
print(json.dumps({form: sass_per_value(form) for form in SASS_WEIGHTS}))
"""


def test_compiled_for_sm90_only_the_plain_int8_loop_has_int_to_float_conversions():
    per_value = json.loads(run_uninterpreted(SASS).splitlines()[-1])
    assert per_value["int8, I2F"]["I2F"] == 1.0  # one a weight value: the quarter-rate instruction
    assert not any(per_value["int8, integer + float add"].values())
    assert per_value["fp8"]["I2F"] == 0 and per_value["fp8"]["F2FP"] > 0  # float8 pairs to half, then to float


def test_the_fit_recovers_a_fixed_cost_and_a_rate():
    rows = [  # 5 us a launch + 2,000 GB/s, and a slower tile that the fit must not take
        {"form": "f", "product": name, "n": n, "k": 1000, "us": 5.0 + n * 1000 / 2e6}
        for name, n in (("a", 1000), ("b", 8000), ("c", 64000))
    ] + [{"form": "f", "product": "a", "n": 1000, "k": 1000, "us": 50.0}]
    (line,) = iw.fit(rows)
    assert line["form"] == "f" and line["fixed_us"] == 5.0 and line["rate_gb_s"] == 2000
