"""bench/persistent_chain.py: the chain kernel against the float32 reference in Triton's
interpreter (one launch per product, and every product in one program, which needs no barrier),
and the persistent form compiled for sm_90: its grid barrier is a release add and an acquire load
at GPU scope after the program's threads meet, the next product's weight is asked of L2 before
the program arrives, and the products' inputs are read from L2."""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")
from bench import persistent_chain as pc

from ..compiled import run_uninterpreted

SMALL = dict(hidden=32, qkv=48, inter=64)


def _run(chain, fn):
    bufs = torch.zeros(2, chain.width)
    x = torch.randn(SMALL["hidden"], generator=torch.Generator().manual_seed(1))
    bufs[0, : x.numel()] = x
    fn(bufs)
    return bufs[len(chain.shapes) % 2, : SMALL["hidden"]], pc.reference(chain, x)


def test_chain_shapes_and_weights_are_the_layers_products():
    chain = pc.make_chain(2, "cpu", **SMALL)
    assert chain.names == ["qkv", "o", "gate_up", "down"] * 2
    assert chain.shapes[:4] == [(48, 32), (32, 32), (128, 32), (32, 64)]
    assert chain.table[:, 2:].tolist() == [list(s) for s in chain.shapes]
    w, s = chain.weights()[3]
    assert w.shape == (32, 64) and torch.allclose(s, torch.full((32,), 64**-0.5))


@pytest.mark.parametrize("tile", [(8, 16, 1), (16, 32, 2)])
def test_one_launch_per_product_matches_the_reference(tile):
    chain = pc.make_chain(2, "cpu", **SMALL)
    y, ref = _run(chain, lambda bufs: pc.chain_per_launch(chain, bufs, tile, pdl=False))
    assert pc.rel_error(y, ref) < 1e-5, (y[:4], ref[:4])


def test_every_product_in_one_program_matches_the_reference():
    chain = pc.make_chain(2, "cpu", **SMALL)

    def one_program(bufs):  # a grid of one needs no barrier: the loop over products and tiles alone
        pc._chain_kernel[(1,)](
            chain.weight, chain.scale, chain.table, bufs, bufs, 0, len(chain.shapes),
            BUF=bufs.shape[1], BLOCK_N=8, BLOCK_K=16, PERSISTENT=False, PDL=False, PREFETCH=0, X_L2=True,
        )  # fmt: skip

    y, ref = _run(chain, one_program)
    assert pc.rel_error(y, ref) < 1e-5


def test_the_engine_form_of_the_chain_matches_the_reference():
    chain = pc.make_chain(1, "cpu", hidden=64, qkv=96, inter=128)
    x = torch.randn(64, generator=torch.Generator().manual_seed(2))
    y = pc.engine_chain(chain, x, pdl=False)  # bf16 between products: a bf16-sized error
    assert y.shape == (64,) and pc.rel_error(y, pc.reference(chain, x)) < 3e-2


def test_a_wrong_chain_is_caught_by_the_check():
    chain = pc.make_chain(1, "cpu", **SMALL)
    y, ref = _run(chain, lambda bufs: pc.chain_per_launch(chain, bufs, (8, 16, 1), pdl=False))
    assert pc.rel_error(-y, ref) > 1.0  # the error the bench reports is not blind to a wrong result


PTX = r"""
import triton
from triton.backends.compiler import GPUTarget
from bench.persistent_chain import _chain_kernel
sig = {"w": "*fp8e4nv", "scale": "*fp32", "table": "*i64", "bufs": "*fp32", "counter": "*i32", "first": "i32",
       "last": "i32"}
consts = dict(BUF=16384, BLOCK_N=4, BLOCK_K=1024, PERSISTENT=True, PDL=False, PREFETCH=8, X_L2=True)
sig.update({k: "constexpr" for k in consts})
src = triton.compiler.ASTSource(fn=_chain_kernel, signature=sig, constexprs=consts)
lines = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"].splitlines()
first = lambda m: next((n for n, l in enumerate(lines) if m in l), -1)
print(first("prefetch.global.L2"), first("red.global.gpu.release.add"), first("ld.global.gpu.acquire"),
      first("ld.global.cg"), sum("bar.sync" in l for l in lines))
"""


def test_the_persistent_kernel_compiles_with_its_barrier_for_sm90():
    prefetch, arrive, wait, input_load, syncs = map(int, run_uninterpreted(PTX).split()[-5:])
    assert 0 <= input_load and 0 < prefetch < arrive < wait and syncs >= 2
