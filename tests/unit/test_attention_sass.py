"""The decode attention kernel over an fp8 cache, compiled for sm_90 on this CPU (Triton's bundled
ptxas and cuobjdump, in a fresh process outside the interpreter): with values stored [D, PAGE] a
block (`pages.value_pool`, the runtime's cache) the P.V product's operand goes from global memory to
shared by asynchronous copies and on to the Tensor Cores by ldmatrix, bytes never moved one by one;
values stored [PAGE, D] go through registers, byte permutes (PRMT) and spills, a third more
instructions (bench.attention_sweep times both)."""

import pytest

pytest.importorskip("triton")

from ..compiled import run_uninterpreted

SASS_OPS = r"""
from bench.int8_widening import sass_ops
from tritonllm.runtimes.kernels import attention

i32 = lambda *names: {n: "i32" for n in names}
sig = {"q": "*bf16", "k_cache": "*fp8e4nv", "v_cache": "*fp8e4nv", "table": "*i32",
       **{n: "*i64" for n in ("pos", "row_slot", "tile_row", "tile_len")}, "out": "*bf16", "part": "*fp32",
       "kv_scale": "*fp32", **i32("limit", "window"), "scale": "fp32", "softcap": "fp32",
       **i32("s_q_b", "s_q_h", "s_table", "s_c_block", "s_c_head", "s_c_pos", "s_v_pos", "s_v_d")}
tile = dict(PAGE=16, HAS_SLOTS=False, TILED=False, G=4, R=16, D=128, BLOCK_N=64, CAPPED=False, FP8=True, HKV=8,
            KT=True, SPLITS=1, PDL=False)
aligned = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 15, 16, 17, 18, 19, 20]  # pointers and strides, multiples of 16
for layout, v_pos, v_d in (("pages", 1, 16), ("rows", 128, 1)):  # a stride of 1 is a constant to Triton
    one = "s_v_pos" if v_pos == 1 else "s_v_d"
    consts = dict(tile, **{one: 1})
    s = {**sig, **{k: "constexpr" for k in consts}}
    ops = sass_ops(attention._decode_attention_kernel, s, consts, aligned + [22 if v_pos == 1 else 21], 2)
    print(layout, sum(ops.values()), ops["LDS.U8"], ops["PRMT"], ops["STL"], ops["F2FP.F16.E4M3.UNPACK_B"])
"""


def test_fp8_values_reach_the_tensor_cores_without_byte_moves_only_from_the_runtime_layout():
    out = run_uninterpreted(SASS_OPS).splitlines()
    found = {r.split()[0]: [int(v) for v in r.split()[1:]] for r in out}
    (total, byte_loads, permutes, spills, widened), rows = found["pages"], found["rows"]
    assert byte_loads == 0 and spills == 0 and permutes < 16, out
    assert rows[2] > 8 * permutes and total < 0.85 * rows[0], out
    assert widened == rows[4] > 0, out  # the same fp16 widening of every key and value either way
