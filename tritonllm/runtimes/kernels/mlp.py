"""A gated MLP's three steps in one kernel for decode batches of a few rows (OpenAI Triton):
gate_up's product, act(gate) * up and the down product.

At one row a small product's time is mostly its fixed cost (its programs' first DRAM round trip,
the tail of the last ones, the wait for the kernel before: ~4-5 us each, docs/decisions.md), not
its bytes. Here a program owns BLOCK_I columns of the activation: it makes their gate and up
sums over the whole input row, the activation of them, and their share of the down product
(down's weight columns of the same BLOCK_I), which it adds into a float32 row of sums with
atomic adds. No program waits for another, so the down product needs no kernel of its own, and
its weight streams while other programs still read gate_up's. The add + norm kernel after it reads
the sums as `Accumulated` and zeroes them for the next layer (no memset per layer).

The sums' order across programs is the atomics' order: the output equals the unfused products
within float32 rounding, not bit for bit, and may differ in the last bits between runs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from . import gating
from . import pdl as gdc
from .gemv import (
    X_AS_GIVEN,
    X_ROUNDED_PER_ROW,
    X_ROUNDED_PER_STEP,
    Accumulated,
    _finish,
    _k_step,
    dequantized,
    gated_key,
    row_scales,
    takes_rounded,
)
from .rows import QuantRows

MAX_ROWS = 16  # rows a program holds (the tensor cores' narrow side, padded to 16)
# (activation columns a program, K step of gate_up, output columns a step of down, warps, stages,
# x mode (gemv's 6th number), form): the candidates start-up timing chooses from. Forms: the tensor
# cores with x's rows as the first operand (PLAIN), or swapped, the weight on their wide side (64-128 of
# its rows) as gemv's fastest small-batch float8 tiles do (SWAPPED); 32 columns a program give 2x the
# programs on a 8,192-wide activation. (A CUDA-core form at 1-2 rows, meant to spare the padded rows'
# atomic adds, timed 5-6x slower than these on an H100: docs/decisions.md.)
MLPConfig = tuple[int, int, int, int, int, int, int]
PLAIN, SWAPPED = 0, 1  # a config's 7th number
TILES = ((64, 256, 128, 4, 3, SWAPPED), (32, 256, 128, 4, 3, PLAIN), (128, 256, 128, 8, 3, SWAPPED),
         (64, 128, 256, 4, 4, SWAPPED))  # fmt: skip


def candidates(weight: torch.Tensor, rounded: bool) -> list[MLPConfig]:
    """The tiles to time for gate_up's weight as stored: rows rounded per row by their producer
    (`rounded`, float8 weights) take the 8-bit x 8-bit form only; other float8 weights the widened
    form and activations rounded per K step; 16-bit ones (or int8) as given."""
    float8 = weight.dtype == torch.float8_e4m3fn
    if rounded:
        modes = (X_ROUNDED_PER_ROW,)
    else:
        modes = (X_AS_GIVEN, X_ROUNDED_PER_STEP) if float8 else (X_AS_GIVEN,)
    return [(*t[:5], m, t[5]) for t in TILES for m in modes]


@triton.jit
def _mlp_kernel(
    x,
    x_scale,
    w_gu,
    s_gu,
    w_down,
    s_down,
    out,
    like,
    M,
    D,
    F,
    s_xm,
    HAS_SCALE: tl.constexpr,
    QUANT_X: tl.constexpr,
    DOWN_X: tl.constexpr,
    SWAP: tl.constexpr,
    GELU: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PDL: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)  # this program's activation columns
    m = tl.arange(0, BLOCK_M)
    c_ok, m_ok = cols < F, m < M
    gdc.enter(PDL)
    if SWAP:
        acc_g = tl.zeros([BLOCK_I, BLOCK_M], dtype=tl.float32)
    else:
        acc_g = tl.zeros([BLOCK_M, BLOCK_I], dtype=tl.float32)
    acc_u = tl.zeros_like(acc_g)
    for k0 in range(0, D, BLOCK_K):  # gate and up rows `cols` (and F + cols) over the whole input row
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < D
        xt = tl.load(x + m[:, None] * s_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        acc_g += _k_step(xt, w_gu, cols, c_ok, k, k_ok, D, QUANT_X, SWAP)
        acc_u += _k_step(xt, w_gu, cols + F, c_ok, k, k_ok, D, QUANT_X, SWAP)
    rows = row_scales(x_scale, m, m_ok, QUANT_X)
    g = _finish(acc_g, rows, s_gu, s_gu, m, m_ok, cols, c_ok, 0, SWAP, QUANT_X, HAS_SCALE, False)
    u = _finish(acc_u, rows, s_gu, s_gu, m, m_ok, cols + F, c_ok, 0, SWAP, QUANT_X, HAS_SCALE, False)
    ty = like.dtype.element_ty
    act = gating.glu(g.to(ty).to(tl.float32), u.to(ty).to(tl.float32), like, GELU)  # [BLOCK_M, BLOCK_I]
    for n0 in range(0, D, BLOCK_N):  # this program's share of every output column of down
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < D
        part = _k_step(act, w_down, n, n_ok, cols, c_ok, F, DOWN_X, SWAP)
        part = _finish(part, rows, s_down, s_down, m, m_ok, n, n_ok, 0, SWAP, DOWN_X, HAS_SCALE, False)
        tl.atomic_add(out + m[:, None] * D + n[None, :], part, mask=m_ok[:, None] & n_ok[None, :], sem="relaxed")


def fused_mlp(
    x: torch.Tensor | QuantRows,
    gate_up: tuple[torch.Tensor, torch.Tensor | None],
    down: tuple[torch.Tensor, torch.Tensor | None],
    activation: str,
    config: MLPConfig,
    sums: torch.Tensor | None = None,
    pdl: bool = False,
) -> Accumulated:
    """down(act(x @ gate.T) * (x @ up.T)) of x [..., D] (or rows rounded per row, `QuantRows`,
    for a config whose 6th number is 2), gate_up's weight [2F, D] (gate rows, then up rows) and
    down's [D, F], each (weight, per-output-channel scale or None) as `gemv.small_matmul` takes
    them; no biases. The result is added into `sums` [rows, D] float32 (zeros, made here where
    None) and returned as `Accumulated`: its consumer reads and zeroes them."""
    (w_gu, s_gu), (w_down, s_down) = gate_up, down
    mode, form = config[5], config[6]
    rounded = isinstance(x, QuantRows)
    if (mode == X_ROUNDED_PER_ROW) != rounded:
        raise ValueError(f"mlp config {config}: a 6th number 2 takes QuantRows and only it; got {type(x).__name__}")
    if mode != X_AS_GIVEN and w_gu.dtype != torch.float8_e4m3fn:
        raise ValueError(f"mlp config {config} rounds activations to float8: it needs float8 weights, not {w_gu.dtype}")
    gelu = gating.check_activation(activation, "the fused MLP")
    values, x_scale, shape, dtype = (x.q, x.scale, x.shape, x.dtype) if rounded else (x, x, x.shape, x.dtype)
    values = values.reshape(-1, shape[-1])
    rows, d, f = shape.numel() // shape[-1], shape[-1], w_down.shape[1]  # (QuantRows pad q's rows)
    if rows > MAX_ROWS or w_gu.shape != (2 * f, d) or w_down.shape != (d, f):
        raise ValueError(
            f"fused MLP: {rows} rows of {d} (at most {MAX_ROWS}), gate_up {tuple(w_gu.shape)}, down "
            f"{tuple(w_down.shape)}: needs gate_up [2F, D] and down [D, F]"
        )
    if not (w_gu.is_contiguous() and w_down.is_contiguous()):  # the kernel steps rows by D and F
        raise ValueError("fused MLP: gate_up's and down's weights must be contiguous: pass .contiguous() ones")
    sums = torch.zeros(rows, d, dtype=torch.float32, device=values.device) if sums is None else sums
    block_i, block_k, block_n, warps, stages = config[:5]
    _mlp_kernel[(triton.cdiv(f, block_i),)](
        values,
        x_scale,
        w_gu,
        s_gu if s_gu is not None else w_gu,
        w_down,
        s_down if s_down is not None else w_down,
        sums,
        gating.like(values, dtype),  # (x itself, or one element of its type where x came rounded)
        rows,
        d,
        f,
        values.stride(0),
        HAS_SCALE=s_gu is not None,
        QUANT_X=mode,
        DOWN_X=X_ROUNDED_PER_STEP if mode != X_AS_GIVEN else X_AS_GIVEN,  # float8 x float8: the activation too
        SWAP=form == SWAPPED,
        GELU=gelu,
        BLOCK_M=max(16, triton.next_power_of_2(rows)),
        BLOCK_I=block_i,
        BLOCK_K=block_k,
        BLOCK_N=block_n,
        num_warps=warps,
        num_stages=stages,
        **gdc.launch(pdl),
    )
    return Accumulated(sums.view(1, rows, d), dtype)


def reference(x: torch.Tensor, gate_up, down, activation: str) -> torch.Tensor:
    """The unfused MLP in float32 on x (8-bit weights dequantized): what a tile is checked against."""
    gu, f = x.float() @ dequantized(*gate_up).T, down[0].shape[1]
    g, u = gu[..., :f], gu[..., f:]
    a = torch.nn.functional.gelu(g, approximate="tanh") if activation == "gelu_tanh" else torch.nn.functional.silu(g)
    return (a * u) @ dequantized(*down).T


KEY = "mlp"  # the decode table's key (with batch rows) of the fused MLP's tile
TOLERANCE = 2e-2  # activations as given: the activation rounded to their type once
X8_TOLERANCE = 0.2  # float8 activations: rounded before each of the two products (gemv.X8_TOLERANCE each)


def tune(layers: list, report: list, table: dict, rows: Sequence[int], activation: str, dtype, consume, pdl: bool):
    """Where the fused MLP beats the decode step's MLP as tuned so far: for each batch of `rows` up
    to MAX_ROWS with gate_up and down timings in `report` (`gemv_tuning.tune`'s, each product timed
    with its consumer), the `candidates` taking x as gate_up's entry in `table` does (rounded per row
    or not) are checked against `reference` and timed over every layer (`layers`: (gate_up, down),
    each (weight, scale)), each followed by `consume` (the add + norm after down, which zeroes the
    sums); kept where under `timing.ATOMICS_MARGIN` of the cheapest of gate_up + activation + down,
    the gated down and gate_up making the activation (their report rows). `dtype`: the
    activations'. Returns ({(KEY, rows): tile}, timings)."""
    from .qmatmul import round_rows
    from .timing import agrees, check_all, graph_ms, keep_unordered

    timed = {(r["kind"], r["rows"]): r["us"] for r in report}
    (w0, _), (d0, _) = layers[0]
    found, out = {}, []
    for m in (r for r in rows if r <= MAX_ROWS and ("gate_up", r) in timed and ("down", r) in timed):
        times = {"as tuned": _current_us(timed, m) / 1e3}  # ms
        x = torch.randn(m, 1, w0.shape[1], device=w0.device, dtype=dtype)
        rounded = takes_rounded(table.get(("gate_up", m)))
        given = round_rows(x, w0.dtype) if rounded else x
        ref = reference(x, *layers[0], activation).view(m, 1, -1)
        tiles = candidates(w0, rounded)
        tol = lambda c: TOLERANCE if c[5] == X_AS_GIVEN else X8_TOLERANCE
        run = lambda c, p=False: lambda: fused_mlp(given, *layers[0], activation, c, pdl=p).total()
        ok = check_all([lambda c=c: agrees(f"mlp {c}", run(c), ref, tol(c)) for c in tiles], w0.device, ref)
        sums = torch.zeros(m, d0.shape[0], dtype=torch.float32, device=w0.device)
        for cfg in (c for c, agreed in zip(tiles, ok) if agreed):
            run(cfg, pdl)()  # the form the step launches, compiled before its graph
            step = lambda c=cfg: [consume(fused_mlp(given, gu, dn, activation, c, sums, pdl)) for gu, dn in layers]
            times[cfg] = graph_ms(step)
        keep_unordered(found, out, KEY, m, times, "fused MLP")
    return found, out


def _current_us(timed: dict, m: int) -> float:
    """Microseconds of the decode step's MLP at m rows as tuned before this stage (over every layer,
    with the consumers): gate_up (its timings include the activation kernel after it) + down, less
    what the gated down saves (its row: the activation kernel + the plain tile against the gated
    tiles), or gate_up making the activation (its row holds the unfused sum and the pairs)."""
    unfused = min(timed[("gate_up", m)].values()) + min(timed[("down", m)].values())
    gated = timed.get((gated_key("down"), m), {})
    act = next((t for c, t in gated.items() if c.startswith("activation kernel")), None)
    forms = [unfused, *timed.get(("glu", m), {}).values()]
    if act is not None:
        forms.append(unfused - (act - min(gated.values())))
    return min(forms)
