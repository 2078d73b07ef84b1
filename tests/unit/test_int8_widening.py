"""bench/int8_widening.py: the integer + float add widening gives exactly the int8 values (every
one of the 256, and a gemv through both ways bit for bit in Triton's interpreter), and compiled for
sm_90 it leaves no int-to-float conversion in the loop while the plain way has one."""

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


PTX = r"""
import triton
from triton.backends.compiler import GPUTarget
from bench.int8_widening import _gemv_kernel
for magic in (False, True):
    sig = {"x": "*bf16", "w": "*i8", "scale": "*fp32", "out": "*fp32", "N": "i32", "K": "i32",
           "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "MAGIC": "constexpr"}
    consts = {"BLOCK_N": 4, "BLOCK_K": 1024, "MAGIC": magic}
    src = triton.compiler.ASTSource(fn=_gemv_kernel, signature=sig, constexprs=consts)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    print(sum("cvt.rn.f32.s" in line for line in ptx.splitlines()))
"""


def test_compiled_for_sm90_the_add_form_has_no_int_to_float_conversion():
    plain, magic = map(int, run_uninterpreted(PTX).split()[-2:])
    assert plain > 0 and magic == 0


def test_the_fit_recovers_a_fixed_cost_and_a_rate():
    rows = [  # 5 us a launch + 2,000 GB/s, and a slower tile that the fit must not take
        {"form": "f", "product": name, "n": n, "k": 1000, "us": 5.0 + n * 1000 / 2e6}
        for name, n in (("a", 1000), ("b", 8000), ("c", 64000))
    ] + [{"form": "f", "product": "a", "n": 1000, "k": 1000, "us": 50.0}]
    (line,) = iw.fit(rows)
    assert line["form"] == "f" and line["fixed_us"] == 5.0 and line["rate_gb_s"] == 2000
