"""Is a persistent decode step worth building? The 1B's products at one row are a few microseconds
of bytes each, and each spends about as long again filling and draining the GPU (the 1B fp8 step's
products take twice their bytes' time). This bench times a chain of the 1B's layer products (qkv,
o, gate_up, down for each of `--layers` layers; fp8 weights with a scale per output channel; each
product reading the one before's output, as a decode step's do) in three forms, each replayed from
a CUDA graph:

- `engine gemv`: one launch per product, the engine's `gemv.small_matmul` with tiles the 1B fp8
  tuner chose or came within 1 % of (PDL on), as the served step runs them;
- `chain per launch`: this file's kernel, one launch per product (PDL on);
- `persistent`: the same kernel launched once, `--per-sm` programs per SM taking every product's
  column tiles in turn and meeting at a grid-wide barrier (an atomic counter) between products;
- `persistent + L2 prefetch`: the same, each program asking L2 for the first K step of its next
  tile's weight rows before it waits at the barrier; `persistent, inputs through L1`: the inputs
  read with plain loads instead of past L1 (the check against the reference would show stale values);

against the weights' bytes over the copy bandwidth. The chain's kernel and barrier are the
experiment, not the engine's (docs/decisions.md says what the numbers decided).

  python -m bench.persistent_chain --layers 16
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from tritonllm.runtimes.kernels import pdl as gdc

log = logging.getLogger("bench.persistent_chain")
HIDDEN, QKV, INTER = 2048, 3072, 8192  # Llama-3.2-1B
# the engine's tile per product (rows of W, K step, warps): the 1B fp8 tuner's choice or within 1 % of it
ENGINE_TILES = {"qkv": (4, 1024, 4), "o": (2, 2048, 4), "gate_up": (4, 1024, 4), "down": (2, 4096, 4)}
TILES = ((4, 1024, 4), (2, 2048, 4), (8, 1024, 4), (8, 512, 4), (16, 512, 4))  # (BLOCK_N, BLOCK_K, warps)
PREFETCH_LINES = 8  # 128-byte lines a weight row of the next product's first tile asks of L2 before the barrier
SM_THREADS = 2048  # resident threads an SM holds (Hopper)


@dataclass
class Chain:
    """The products of `layers` layers, weights in one float8 buffer (row-major [N, K] each), their
    scales in one float32 buffer, `table` [products, 4] int64 on the device: each product's weight
    offset, scale offset, N and K."""

    names: list[str]
    shapes: list[tuple[int, int]]  # (N, K)
    weight: torch.Tensor
    scale: torch.Tensor
    table: torch.Tensor

    def weights(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out, w_at, s_at = [], 0, 0
        for n, k in self.shapes:
            out.append((self.weight[w_at : w_at + n * k].view(n, k), self.scale[s_at : s_at + n]))
            w_at, s_at = w_at + n * k, s_at + n
        return out

    @property
    def width(self) -> int:
        return max(max(n, k) for n, k in self.shapes)


def make_chain(layers: int, device, hidden=HIDDEN, qkv=QKV, inter=INTER, seed: int = 0) -> Chain:
    """Random float8 weights scaled by 1/sqrt(K) per output row, so values keep unit size along the chain."""
    per = [("qkv", qkv, hidden), ("o", hidden, hidden), ("gate_up", 2 * inter, hidden), ("down", hidden, inter)]
    names = [name for _ in range(layers) for name, _, _ in per]
    shapes = [(n, k) for _ in range(layers) for _, n, k in per]
    gen = torch.Generator(device=device).manual_seed(seed)
    weight = torch.empty(sum(n * k for n, k in shapes), dtype=torch.float8_e4m3fn, device=device)
    scale = torch.empty(sum(n for n, _ in shapes), dtype=torch.float32, device=device)
    rows, w_at, s_at = [], 0, 0
    for n, k in shapes:
        block = torch.randn(n * k, generator=gen, device=device).clamp_(-4, 4)
        weight[w_at : w_at + n * k] = block.to(torch.float8_e4m3fn)
        scale[s_at : s_at + n] = k**-0.5
        rows.append((w_at, s_at, n, k))
        w_at, s_at = w_at + n * k, s_at + n
    return Chain(names, shapes, weight, scale, torch.tensor(rows, dtype=torch.int64, device=device))


def reference(chain: Chain, x: torch.Tensor) -> torch.Tensor:
    """The chain in float32 on the dequantized weights: each product reads the first K values of the last output."""
    y = x.float()
    for w, s in chain.weights():
        y = (w.float() * s[:, None]) @ y[: w.shape[1]]
    return y


@triton.jit
def grid_barrier(counter, target):
    """This program's threads done (their stores issued), it arrives (a release add), then waits
    until `target` arrivals in all (acquire): every program's earlier stores are visible after."""
    tl.debug_barrier()
    tl.atomic_add(counter, 1, sem="release", scope="gpu")
    while tl.atomic_add(counter, 0, sem="acquire", scope="gpu") < target:
        pass
    tl.debug_barrier()


@triton.jit
def _chain_kernel(
    w, scale, table, bufs, counter, first, last,
    BUF: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PERSISTENT: tl.constexpr, PDL: tl.constexpr,
    PREFETCH: tl.constexpr, X_L2: tl.constexpr,
):  # fmt: skip
    """Products first..last-1 of `table`: product p reads bufs[p % 2] and writes bufs[(p + 1) % 2],
    this program taking column tiles pid, pid + programs, ...; with PERSISTENT every program meets
    the others between products (the next product reads what all of them wrote), having asked L2
    for PREFETCH lines of each weight row of its first tile of the next product (which no program
    writes), so those bytes travel while it waits."""
    gdc.enter(PDL)
    pid, programs = tl.program_id(0), tl.num_programs(0)
    n_i, k_i = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_K)
    for p in range(first, last):
        w_at, s_at = tl.load(table + p * 4), tl.load(table + p * 4 + 1)
        N, K = tl.load(table + p * 4 + 2).to(tl.int32), tl.load(table + p * 4 + 3).to(tl.int32)
        src, dst = bufs + (p % 2) * BUF, bufs + ((p + 1) % 2) * BUF
        for t in range(pid, tl.cdiv(N, BLOCK_N), programs):
            rows = t * BLOCK_N + n_i
            ok = rows < N
            acc = tl.zeros([BLOCK_N], tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k = k0 + k_i
                at = w_at + rows[:, None].to(tl.int64) * K + k[None, :]
                wt = tl.load(w + at, mask=ok[:, None] & (k < K)[None, :], other=0.0).to(tl.float32)
                if X_L2:  # past this SM's L1, which may hold the last product's values from before a barrier
                    xk = tl.load(src + k, mask=k < K, other=0.0, cache_modifier=".cg")
                else:
                    xk = tl.load(src + k, mask=k < K, other=0.0)
                acc += tl.sum(wt * xk[None, :], 1)
            tl.store(dst + rows, acc * tl.load(scale + s_at + rows, mask=ok, other=0.0), mask=ok)
        if PERSISTENT and p + 1 < last:
            if PREFETCH:
                q = (p + 1) * 4
                nxt, n_next, k_next = tl.load(table + q), tl.load(table + q + 2), tl.load(table + q + 3)
                rows = pid * BLOCK_N + n_i
                gdc.prefetch_rows(w + nxt, rows, rows < n_next, k_next.to(tl.int32), 0, k_next, PREFETCH, 1)
            grid_barrier(counter, (p - first + 1) * programs)


def chain_per_launch(chain: Chain, bufs: torch.Tensor, tile, pdl: bool) -> None:
    """One launch per product, a program per column tile."""
    for p, (n, _) in enumerate(chain.shapes):
        _launch(chain, bufs, bufs, (triton.cdiv(n, tile[0]),), p, p + 1, tile, PER_LAUNCH, pdl)


class Form(NamedTuple):
    """A form of the chain kernel: one launch for every product with barriers between them
    (`persistent`) or one launch per product; L2 lines a weight row of the next tile asked for
    before each barrier (0: none); whether the products' inputs are read past L1."""

    label: str
    persistent: bool
    prefetch: int
    x_l2: bool


PER_LAUNCH = Form("chain per launch", False, 0, False)  # launches order the products: plain loads, nothing to prefetch
PERSISTENT_FORMS = (
    Form("persistent", True, 0, True),
    Form("persistent + L2 prefetch", True, PREFETCH_LINES, True),
    Form("persistent, inputs through L1", True, 0, False),
)


def _launch(chain: Chain, bufs, counter, grid, first: int, last: int, tile, form: Form, pdl: bool):
    """The chain kernel over products first..last-1 in `form`; returns the compiled kernel."""
    block_n, block_k, warps = tile
    return _chain_kernel[grid](
        chain.weight, chain.scale, chain.table, bufs, counter, first, last,
        BUF=bufs.shape[1], BLOCK_N=block_n, BLOCK_K=block_k, PERSISTENT=form.persistent,
        PREFETCH=form.prefetch, X_L2=form.x_l2, num_warps=warps, **gdc.launch(pdl),
    )  # fmt: skip


def chain_persistent(chain: Chain, bufs, counter: torch.Tensor, tile, programs: int, form: Form) -> None:
    """One launch of `programs` programs (all resident at once, or the barrier never opens)."""
    counter.zero_()
    _launch(chain, bufs, counter, (programs,), 0, len(chain.shapes), tile, form, pdl=False)


def resident_programs(chain: Chain, bufs, counter: torch.Tensor, tile, per_sm: int, form: Form) -> int | None:
    """Programs of the persistent kernel with `tile` at `per_sm` a SM, where its registers, shared
    memory and warps let that many stay resident at once (else None: its barrier would never open).
    The kernel is compiled by a launch that runs no product."""
    props = triton.runtime.driver.active.utils.get_device_properties(torch.cuda.current_device())
    warps = tile[2]
    k = _launch(chain, bufs, counter, (1,), 0, 0, tile, form, pdl=False)
    k._init_handles()
    fits = min(  # registers and shared memory of an SM (Hopper's: a block may take all), 2,048 threads an SM
        props["max_num_regs"] // max(1, k.n_regs * 32 * warps),
        SM_THREADS // (32 * warps),
        props["max_shared_mem"] // max(1, k.metadata.shared),
    )
    log.info("tile %s: %d registers a thread, %d B shared: %d programs a SM", tile, k.n_regs, k.metadata.shared, fits)
    return props["multiprocessor_count"] * per_sm if per_sm <= fits else None


def engine_chain(chain: Chain, x: torch.Tensor, pdl: bool) -> torch.Tensor:
    """The chain as the served step runs its products: `gemv.small_matmul` per product, bf16 between."""
    from tritonllm.runtimes.kernels import gemv

    y = x.to(torch.bfloat16)[None]
    for name, (w, s) in zip(chain.names, chain.weights()):
        y = gemv.small_matmul(y[:, : w.shape[1]], w, None, ENGINE_TILES[name], scale=s, pdl_steps=0 if pdl else None)
    return y[0]


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y[: ref.numel()].float() - ref).abs().max() / ref.abs().max())


def measure(chain: Chain, per_sm: list[int], reps: int, bandwidth: float, emit) -> None:
    """Every form's time per chain (us), its share of the bytes' time, and its error against `reference`."""
    from tritonllm.runtimes.kernels.timing import graph_ms

    x = torch.randn(HIDDEN, device="cuda")
    ref = reference(chain, x)
    floor_us = 1e6 * chain.weight.numel() / bandwidth
    bufs = torch.zeros(2, chain.width, device="cuda")
    counter = torch.zeros(1, dtype=torch.int32, device="cuda")
    final = bufs[len(chain.shapes) % 2]
    pdl = gdc.supported(x.device)

    def row(form, tile, programs, fn):
        bufs.zero_()
        bufs[0, :HIDDEN] = x
        out = fn()
        torch.cuda.synchronize()
        err = rel_error(final if out is None else out, ref)
        us = 1e3 * graph_ms(lambda: (bufs[0, :HIDDEN].copy_(x), fn()), reps)
        emit(dict(form=form, tile=str(tile), programs=programs, us=round(us, 1), floor_us=round(floor_us, 1),
                  bytes_share_pct=round(100 * floor_us / us, 1), rel_error=round(err, 5)))  # fmt: skip

    row("engine gemv", ENGINE_TILES, None, lambda: engine_chain(chain, bufs[0, :HIDDEN], pdl))
    for tile in TILES:
        row(PER_LAUNCH.label, tile, None, lambda: chain_per_launch(chain, bufs, tile, pdl))
    for tile in TILES:
        for n in per_sm:
            for form in PERSISTENT_FORMS:
                programs = resident_programs(chain, bufs, counter, tile, n, form)
                if programs is None:
                    log.info("tile %s at %d a SM: cannot all be resident, not run", tile, n)
                    continue
                row(form.label, tile, programs, lambda: chain_persistent(chain, bufs, counter, tile, programs, form))


def main() -> None:
    from bench.measure import write_results
    from bench.provenance import DEFAULT_OUT
    from bench.workloads import copy_bandwidth

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--per-sm", type=int, nargs="+", default=[1, 2, 4, 8], help="persistent programs a SM")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--topic", default="persistent-chain")
    p.add_argument("--out", default=DEFAULT_OUT)
    a = p.parse_args()
    bandwidth = copy_bandwidth()
    chain = make_chain(a.layers, "cuda")
    facts = dict(layers=a.layers, products=len(chain.shapes), weight_bytes=chain.weight.numel(),
                 copy_bandwidth_gb_s=round(bandwidth / 1e9), gpu=torch.cuda.get_device_name())  # fmt: skip
    rows: list[dict] = []

    def emit(r: dict) -> None:  # written after every row: a hung barrier leaves the rows before it
        rows.append(r)
        log.info("%s", r)
        write_results(a.out, a.topic, facts, rows)

    measure(chain, a.per_sm, a.reps, bandwidth, emit)
    print(write_results(a.out, a.topic, facts, rows))


if __name__ == "__main__":
    main()
