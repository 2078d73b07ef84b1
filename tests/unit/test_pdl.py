"""Programmatic dependent launch (kernels/pdl.py): the launch arguments, the prefetch size rule,
and the compiled kernels themselves. A PDL kernel must wait for the kernel before it ahead of every
load of another kernel's output and every store; only its weight prefetch may come first. The
kernels are compiled for sm_90 on this CPU (Triton's bundled ptxas) in a fresh process, since the
interpreter (TRITON_INTERPRET=1, set by the parity tests) has no griddepcontrol."""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # as the parity tests: this process's kernels are interpreted
pytest.importorskip("triton")
from tritonllm.runtimes.kernels import pdl

from ..compiled import run_uninterpreted

PTX_ORDER = r"""
import triton
from triton.backends.compiler import GPUTarget
from tritonllm.runtimes.kernels import attention, attention_o, fused, gemv, mlp, rope_attention

def order(fn, sig, consts, marks, label=None):
    src = triton.compiler.ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in consts}}, constexprs=consts)
    lines = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"].splitlines()
    print(label or fn.__name__, *[next((n for n, l in enumerate(lines) if m in l), -1) for m in marks])

ptr = lambda t, *names: {n: t for n in names}
i32 = lambda *names: {n: "i32" for n in names}
marks = ("prefetch.global.L2", "griddepcontrol.wait", "griddepcontrol.launch_dependents", "ld.global", "st.global")
gemv_sig = {**ptr("*bf16", "x"), "x_scale": "*fp32", "w": "*fp8e4nv", **ptr("*bf16", "bias"), "w_scale": "*fp32",
    "out": "*bf16", "like": "*bf16", **i32("M", "N", "K", "K_SPLIT", "s_xm", "s_wn", "s_os", "s_om"),
    **i32("n_split", "s_split"), **ptr("*bf16", "res", "res_out", "norm_w"), "clear": "*fp32", "n_clear": "i32",
    "eps": "fp32"}
gemv_consts = dict(HAS_BIAS=False, HAS_SCALE=True, USE_DOT=True, QUANT_X=0, SWAP=False, GATED=True, GELU=False,
    GLU=False, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, PDL=True, PREFETCH=2, ELEM=1, NORMED=False, ADD=False, CLEAR=False,
    QMAX=448.0)
order(gemv._small_matmul_kernel, gemv_sig, gemv_consts, marks)
# gate_up's tile making the activation (swapped, rows rounded per row): gate and up tiles both after the wait
glu = dict(gemv_consts, GATED=False, GLU=True, SWAP=True, QUANT_X=2)
order(gemv._small_matmul_kernel, gemv_sig, glu, marks, "glu")
# ... making its input too (residual add + norm, the stream's write, sums zeroed): all after the wait
order(gemv._small_matmul_kernel, gemv_sig, dict(glu, NORMED=True, ADD=True, CLEAR=True, PREFETCH=0), marks, "normed")
# ... asking L2 for its first K step of weight: once the wait is over, before the prologue's loads
order(gemv._small_matmul_kernel, gemv_sig, dict(glu, NORMED=True, ADD=True), marks, "normed_prefetch")
order(gemv._small_matmul_kernel, gemv_sig, dict(gemv_consts, GATED=False, USE_DOT=False, BLOCK_M=1, BLOCK_N=2,
      BLOCK_K=2048, NORMED=True, ADD=True, CLEAR=False, PREFETCH=0), marks, "normed_gemv")
# the fused MLP: its sums leave by atomic adds (`red`), after the wait
order(
    mlp._mlp_kernel,
    {"x": "*fp8e4nv", "x_scale": "*fp32", "w_gu": "*fp8e4nv", "s_gu": "*fp32", "w_down": "*fp8e4nv",
     "s_down": "*fp32", "out": "*fp32", "like": "*bf16", **i32("M", "D", "F", "s_xm")},  # (in the kernel's order)
    dict(HAS_SCALE=True, GELU=False, BLOCK_I=64, PDL=True, QUANT_X=2, DOWN_X=1, SWAP=True, BLOCK_M=16, BLOCK_K=256,
         BLOCK_N=128),
    (*marks[:4], "red.global.gpu.relaxed.add.f32"),
)
order(
    fused._add_rms_norm_kernel,
    {**ptr("*bf16", "x", "residual", "weight", "pre_weight", "out"), "scale_out": "*fp32", "n": "i32",
     "eps": "fp32", "n_split": "i32", "s_split": "i32"},
    dict(BLOCK=1024, PRE=False, QUANT=False, QMAX=448.0, PDL=True, CLEAR=True, ADD=True),  # (zeroing fused MLP sums)
    marks,
)
for fp8 in (False, True):  # the decode step's attention, with the rotary inside it and without
    cache = "*fp8e4nv" if fp8 else "*bf16"
    shared = {**ptr(cache, "k_cache", "v_cache"), "table": "*i32", "out": "*bf16", "part": "*fp32", "kv_scale": "*fp32",
              **i32("limit", "window"), "scale": "fp32", "softcap": "fp32"}
    tile = dict(PAGE=16, G=4, R=16, D=128, BLOCK_N=64, CAPPED=False, FP8=fp8, HKV=8, KT=fp8, SPLITS=2, PDL=True)
    order(
        rope_attention._rope_attention_kernel,
        {**ptr("*bf16", "qkv", "cos", "sin"), **ptr("*i64", "pos", "write_slot"), **shared,
         **i32("n_split", "s_split", "s_qkv", "s_cs", "s_table", "s_c_block", "s_c_head", "s_c_pos", "s_v_pos"),
         **i32("s_v_d")},
        tile,
        marks,
    )
    order(
        attention._decode_attention_kernel,
        {"q": "*bf16", **ptr("*i64", "pos", "row_slot", "tile_row", "tile_len"), **shared,
         **i32("s_q_b", "s_q_h", "s_table", "s_c_block", "s_c_head", "s_c_pos", "s_v_pos", "s_v_d")},
        dict(tile, HAS_SLOTS=False, TILED=False),
        marks,
    )
# attention + o (fp8 cache and weights): the cache write and its sums' atomic adds (`red`) after the wait
ao_sig = {**ptr("*bf16", "qkv", "cos", "sin"), **ptr("*fp8e4nv", "k_cache", "v_cache"), "table": "*i32",
    **ptr("*i64", "pos", "write_slot"), "like": "*bf16", "kv_scale": "*fp32", "w_o": "*fp8e4nv", "s_o": "*fp32",
    "sums": "*fp32", **i32("limit", "window"), "scale": "fp32", "softcap": "fp32",
    **i32("n_split", "s_split", "s_qkv", "s_cs", "s_table", "s_c_block", "s_c_head", "s_c_pos", "s_v_pos", "s_v_d"),
    "N": "i32"}
ao_consts = dict(PAGE=16, G=4, R=16, D=128, BLOCK_N=64, CAPPED=False, FP8=True, HKV=8, KT=True, BLOCK_C=128,
    HAS_SCALE=True, PDL=True, PREFETCH=0, ELEM=1)
order(attention_o._attention_o_kernel, ao_sig, ao_consts, (*marks[:4], "red.global.gpu.relaxed.add.f32"))
# ... asking L2 for its block of o's weight: after the wait, ahead of the attention's loads
order(attention_o._attention_o_kernel, ao_sig, dict(ao_consts, PREFETCH=4), marks, "attention_o_prefetch")
order(
    attention._combine_splits_kernel,
    {"part": "*fp32", "out": "*bf16", "flats": "i32"},
    dict(SPLITS=4, D=64, PDL=True),
    marks,
)
"""


def test_launch_arguments_name_the_constexpr_and_triton_option_only_when_on():
    assert pdl.launch(False) == {"PDL": False}  # an older Triton never sees launch_pdl
    assert pdl.launch(True) == {"PDL": True, "launch_pdl": True}


def test_no_pdl_off_cuda_or_under_the_interpreter():
    assert not pdl.supported(torch.device("cpu"))


@pytest.mark.parametrize(
    "k, block_k, elem, steps, lines",
    [
        (4096, 128, 1, 1, 1),  # one K step of 128 fp8 values: one 128-byte line
        (4096, 256, 1, 2, 4),
        (4096, 256, 2, 1, 4),  # bf16: twice the bytes
        (2048, 4096, 2, 1, 32),  # the step is longer than the row: the row's 4,096 bytes
        (4096, 64, 1, 1, 0),  # under a line: nothing asked for
        (4096, 128, 1, 3, 2),  # 3 lines round down to a power of two
    ],
)
def test_prefetch_lines(k, block_k, elem, steps, lines):
    assert pdl.prefetch_lines(k, block_k, elem, steps) == lines


def test_compiled_pdl_kernels_wait_before_reading_or_writing_activations():
    out = run_uninterpreted(PTX_ORDER)
    rows = {r.split()[0]: [int(v) for v in r.split()[1:]] for r in out.splitlines()}  # (attention: its fp8 form)
    for name in ("_small_matmul_kernel", "glu"):
        prefetch, wait, launch, load, store = rows[name]
        assert 0 <= prefetch < wait < launch < min(load, store), name  # only the weight prefetch runs ahead of the wait
    for name in ("normed", "normed_gemv"):
        prefetch, wait, launch, load, store = rows[name]
        assert prefetch == -1 and 0 <= wait < launch < min(load, store), name
    prefetch, wait, launch, load, store = rows["normed_prefetch"]
    assert 0 <= wait < launch < prefetch < min(load, store)
    prefetch, wait, launch, load, store = rows["attention_o_prefetch"]
    assert 0 <= wait < launch < prefetch < load < store  # o's weight asked for once the wait is over
    for name in (
        "_mlp_kernel",
        "_attention_o_kernel",
        "_add_rms_norm_kernel",
        "_combine_splits_kernel",
        "_rope_attention_kernel",
        "_decode_attention_kernel",
    ):
        prefetch, wait, launch, load, store = rows[name]
        assert prefetch == -1 and 0 <= wait < launch < load < store, (name, rows[name])
