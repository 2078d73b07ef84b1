"""The engine's gemv, compiled for sm_90 (no GPU needed), issues for each row what the plain
one-row loop of bench.int8_widening issues: no round trip of x's K step through shared memory
(a 3D broadcast of the rows stores it there every step: ~1.4x the time at one row)."""

import json
import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")  # as the other kernel tests: set before any import of triton
pytest.importorskip("triton")

from ..compiled import run_uninterpreted

SASS = r"""
import json
from bench.int8_widening import loop_ops, sass_ops
from tritonllm.runtimes.kernels import gemv

block_n, block_k, warps, rows = 4, 1024, 4, ROWS
ints = ["M", "N", "K", "K_SPLIT", "s_xm", "s_wn", "s_os", "s_om", "n_split", "s_split"]
pointers = {"x": "*bf16", "x_scale": "*bf16", "w": "*fp8e4nv", "bias": "*fp8e4nv", "w_scale": "*fp32",
            "out": "*bf16", "like": "*bf16"}
normed = {"res": "*bf16", "res_out": "*bf16", "norm_w": "*bf16", "clear": "*fp32", "n_clear": "i32", "eps": "fp32"}
sig = {**pointers, **{name: "i32" for name in ints}, **normed}
consts = dict(HAS_BIAS=False, HAS_SCALE=True, USE_DOT=False, QUANT_X=0, SWAP=False, GATED=False, GELU=False,
              GLU=False, BLOCK_M=rows, BLOCK_N=block_n, BLOCK_K=block_k, PDL=False, PREFETCH=0, ELEM=1, n_split=1,
              NORMED=False, ADD=False, CLEAR=False, QMAX=448.0)
if rows == 1:  # a launch makes an integer argument of 1 a constant
    consts["M"] = 1
sig.update({name: "constexpr" for name in consts})
aligned = [i for i, name in enumerate(sig) if sig[name] != "constexpr" and name != "s_split"]
engine = sass_ops(gemv._small_matmul_kernel, sig, consts, aligned, warps)
plain = loop_ops("*fp8e4nv", False, (block_n, block_k, warps))
shared = lambda ops: sum(n for op, n in ops.items() if op.startswith("STS"))
print(json.dumps([sum(engine.values()), sum(plain.values()), shared(engine), shared(plain)], separators=(",", ":")))
"""


@pytest.mark.parametrize("rows", [1, 2, 8])
def test_the_gemv_compiles_to_the_plain_loop_once_a_row(rows):
    """Each row costs what the plain loop's one row does (within 5 %), its only shared stores the
    cross-warp sums': x never passes through shared memory. (Rows as one [M, K] tile broadcast
    to 3D took 592 instructions at 2 rows, 1,384 at 8, against 264 for one.)"""
    engine, plain, engine_stores, plain_stores = json.loads(
        run_uninterpreted(SASS.replace("ROWS", str(rows))).split()[-1]
    )
    assert engine <= 1.05 * plain * rows and engine_stores == plain_stores * rows


NORMED = SASS.replace("NORMED=False, ADD=False", "NORMED=True, ADD=True").replace(
    "print(json.dumps([sum(engine.values()), sum(plain.values()), shared(engine), shared(plain)], ",
    "print(json.dumps([engine['STL'] + engine['LDL'], shared(engine), shared(plain)], ",
)


@pytest.mark.parametrize("rows", [1, 2])
def test_the_gemv_making_its_input_spills_nothing_and_stores_only_its_sums_in_shared_memory(rows):
    """With the residual add + norm made in the program (`rows.Normed`): no register spills, and
    beyond the plain loop's cross-warp sums only the prologue's sums of squares (one a row) go
    through shared memory: the normed x of each K step stays in registers."""
    spills, engine_stores, plain_stores = json.loads(run_uninterpreted(NORMED.replace("ROWS", str(rows))).split()[-1])
    assert spills == 0 and engine_stores <= (plain_stores + 1) * rows
