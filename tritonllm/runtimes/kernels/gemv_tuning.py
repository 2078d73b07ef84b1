"""Choosing each small-batch product's tile at start-up (`tune`): the candidates of `gemv` for a
weight kind and batch rows, each checked against cuBLAS's product and timed on every layer's
weight in turn, followed by the fused kernel that reads its output, as a decode step runs them."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .gemv import (
    CONFIGS,
    DOT_CONFIGS,
    FP8_GEMM,
    GLU_KEYS,
    MAX_DOT_ROWS,
    MAX_ROWS,
    QUANT_CONFIGS,
    QUANT_DOT_CONFIGS,
    ROUNDED_TILES,
    SPLIT_TILES,
    SPLITS,
    SWAP_TILES,
    SWAP_WIDE_TILES,
    X8_TILES,
    X8_TOLERANCE,
    X_AS_GIVEN,
    X_ROUNDED_PER_ROW,
    Config,
    Gated,
    SplitK,
    dense,
    gated_key,
    reference,
    small_matmul,
    takes_rounded,
    x_mode,
)
from .timing import agrees, check_all, graph_ms, report_row

log = logging.getLogger(__name__)


def _agrees(given, w, b, s, config: Config, ref: torch.Tensor, pdl_steps: int | None = None) -> bool:
    """The config's product of `given` (x, or x rounded per row where the config takes that) equals
    `ref` (the reference on x) within rounding of the activations' type (of float8 where the config
    multiplies float8). One that agrees is also run as the step launches it (`pdl_steps`), so that
    form is compiled here too."""
    tolerance = X8_TOLERANCE if x_mode(config) != X_AS_GIVEN else 2e-2
    ok = agrees(f"gemv {config}", lambda: dense(small_matmul(given, w, b, config, s)), ref, tolerance)
    if ok and pdl_steps is not None:
        small_matmul(given, w, b, config, s, pdl_steps)
    return ok


def _fp8_gemm_time(x: torch.Tensor, mats, rounded: bool, consume) -> dict:
    """{FP8_GEMM: ms} of the FP8 GEMM over every layer's weight, then the consumer; x as its
    producer hands it (rounded per row already, or not); {} where it disagrees or does not run."""
    from . import qmatmul

    w, b, s = mats[0]
    if not agrees("gemv fp8 GEMM", lambda: qmatmul.fp8_matmul(x, w, s, b), reference(x, w, b, s), X8_TOLERANCE):
        return {}
    if rounded:
        x = qmatmul.round_rows(x, w.dtype)
    return {FP8_GEMM: graph_ms(lambda: [consume(qmatmul.fp8_matmul(x, w, s, b)) for w, b, s in mats])}


def split_configs(dot_configs: Sequence[Config], k: int) -> list[Config]:
    """Each tile unsplit, and the SPLIT_TILES split S ways where every slice holds at least one K step."""
    return list(dot_configs) + [(*tile, s) for tile in SPLIT_TILES for s in SPLITS[1:] if k >= s * tile[1]]


def candidates(
    rows: int,
    weight: torch.Tensor,
    quantized: bool,
    split_ok: bool,
    configs: Sequence[Config],
    dots: Sequence[Config],
    rounded: bool = False,
) -> list[Config]:
    """The tiles timed for `rows` rows of x against `weight` [N, K]: gemv up to MAX_ROWS rows and
    the tensor-core tiles at every row count (a padded 16-row tile streams a weight well even for one
    row), split along K only where the consumer adds up partial sums (`split_ok`); float8 weights
    also try float8 activations, unswapped and swapped (SWAP_TILES), and where the producer rounds x
    per row (`rounded`) the ROUNDED_TILES on that x; other weights swapped tiles of their own type
    (SWAP_WIDE_TILES). `quantized`: the weight is 8-bit (the 8-bit tile lists)."""
    small, dots = (QUANT_CONFIGS, QUANT_DOT_CONFIGS) if quantized else (configs, dots)
    tiles = split_configs(dots, weight.shape[1]) if split_ok else list(dots)
    splits = [s for s in SPLITS if s == 1 or split_ok]  # 8 slices: a 4,096-row weight at a few rows fills the SMs
    fits = lambda t, s: weight.shape[1] >= s * t[1]  # every slice of K holds a K step
    if weight.dtype == torch.float8_e4m3fn:
        tiles += [(*t, s, 1) for t in X8_TILES for s in SPLITS if (s == 1 or split_ok) and fits(t, s)]
        tiles += [(*t, s, 1, 1) for t in SWAP_TILES for s in splits if fits(t, s)]
        if rounded:
            tiles += [(*t[:4], s, X_ROUNDED_PER_ROW, t[4]) for t in ROUNDED_TILES for s in splits if fits(t, s)]
    else:
        tiles += [(*t, s, 0, 1) for t in SWAP_WIDE_TILES for s in splits if fits(t, s)]
    return [*small, *tiles] if rows <= MAX_ROWS else tiles


Consumer = Callable[["torch.Tensor | SplitK"], object]
GATED_TRIES = 6  # the fastest plain tiles of a gated kind also timed reading their input gated: a tile
# streams its weight the same either way, the gated load adds a little work to each K step


@dataclass(frozen=True)
class GatedKind:
    """A kind whose input the activation kernel makes from another product (the down product's, from
    gate_up's): `activate(gate_up's product, rounded)` launches that kernel as the decode step would
    (rounding per row for a product that takes it so), which a gated tile does away with."""

    activation: str  # gating.ACTIVATIONS
    activate: Callable[[torch.Tensor, bool], object]


def tune(
    weights: dict[str, Sequence[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]],
    rows: Sequence[int],
    consumers: dict[str, Consumer] | None = None,
    configs: Sequence[Config] = CONFIGS,
    dot_configs: Sequence[Config] = DOT_CONFIGS,
    dtype: torch.dtype = torch.bfloat16,
    pdl: bool = False,
    rounded: frozenset = frozenset(),
    gated: dict[str, GatedKind] | None = None,
) -> tuple[dict[tuple[str, int], Config | str], list[dict]]:
    """For each weight kind (its (weight, bias, scale) of every layer; scale None unless the weight
    is 8-bit) and batch rows, the fastest of the reference (`reference`: cuBLAS) and the
    `candidates`: `configs` (gemv, up to MAX_ROWS rows) and `dot_configs` (skinny_dot, up to
    MAX_DOT_ROWS), or their 8-bit lists.
    Each product is timed followed by its kind's consumer (`consumers`: the fused kernel that reads
    it in a decode step); only kinds with a consumer, which adds up split partial sums as it loads
    them, try split configs. `dtype`: the activations'. `pdl`: the tiles launched with PDL, as the
    decode step launches them (the consumers too, where they were made so). Float8 weights also
    time the FP8 GEMM (`FP8_GEMM`): on rows already rounded to e4m3 for the kinds in `rounded`
    (their producers round them), else rounding them itself. The kinds in `gated` also time their
    fastest tiles on a `Gated` input against the activation kernel + their fastest product (under
    `gated_key(kind)`). Returns {(kind, rows): config} for the kinds where a config beat cuBLAS
    (and the gated keys where a gated tile beat the activation kernel + the product), and the
    timings (microseconds for all layers' weights of the kind) for the log and the benchmark."""
    from . import qmatmul  # it builds on this module

    consumers, steps, gated = consumers or {}, 0 if pdl else None, gated or {}  # steps: small_matmul's PDL argument
    table, report = {}, []
    for kind, mats in weights.items():
        k = mats[0][0].shape[1]
        consume = consumers.get(kind, dense)
        for m in (r for r in rows if r <= MAX_DOT_ROWS):
            x = torch.randn(m, 1, k, device=mats[0][0].device, dtype=dtype)
            run = lambda f: lambda: [consume(f(x, w, b, s)) for w, b, s in mats]
            times = {"cublas": graph_ms(run(reference))}
            w0, rounds = mats[0][0], kind in rounded and mats[0][0].dtype == torch.float8_e4m3fn
            tiles = candidates(m, w0, mats[0][2] is not None, kind in consumers, configs, dot_configs, rounds)
            xr = qmatmul.round_rows(x, w0.dtype) if rounds else None  # as the kind's producer hands it over
            given = [(c, xr if takes_rounded(c) else x) for c in tiles]
            ref = reference(x, *mats[0]).float()  # (float once: `agrees` compares in float32)
            ok = check_all([lambda c=c, g=g: _agrees(g, *mats[0], c, ref, steps) for c, g in given], x.device, ref)
            for (cfg, g), agreed in zip(given, ok):
                if agreed:
                    times[cfg] = graph_ms(run(lambda _, w, b, s, c=cfg, g=g: small_matmul(g, w, b, c, s, steps)))
            if mats[0][0].dtype == torch.float8_e4m3fn:
                times.update(_fp8_gemm_time(x, mats, kind in rounded, consume))
            best = min(times, key=times.get)
            if best != "cublas":
                table[(kind, m)] = best
            report.append(report_row(kind, m, best, times))
            if kind in gated:
                chosen, gtimes = _tune_gated(mats, m, times, consume, gated[kind], steps, dtype)
                if isinstance(chosen, tuple):  # else the activation kernel + the product stay
                    table[(gated_key(kind), m)] = chosen
                report.append(report_row(gated_key(kind), m, chosen, gtimes))
    for r in report:
        log.info("gemv %s x%d: %s (%s)", r["kind"], r["rows"], r["chosen"], r["us"])
    return table, report


def _tune_gated(mats, m: int, times: dict, consume: Consumer, spec: GatedKind, steps: int | None, dtype) -> tuple:
    """(the tile that reads the kind's input gated at m rows, or the unfused form's name where none
    is faster; {form: ms}): the GATED_TRIES fastest plain tiles in `times` (the kind's timings) on
    gate_up's product against the activation kernel + the fastest product, each then `consume`d."""
    w0 = mats[0][0]
    fastest = min(times, key=times.get)
    plain = [c for c in sorted(times, key=times.get) if isinstance(c, tuple) and x_mode(c) != X_ROUNDED_PER_ROW]
    gate_up = torch.randn(m, 1, 2 * w0.shape[1], device=w0.device, dtype=dtype)
    act = graph_ms(lambda: [spec.activate(gate_up, takes_rounded(fastest)) for _ in mats])
    out = {f"activation kernel + {fastest}": times[fastest] + act}
    x = Gated(gate_up, spec.activation)
    ref = reference(dense(spec.activate(gate_up, False)), *mats[0]).float()
    tries = plain[:GATED_TRIES]
    ok = check_all([lambda c=c: _agrees(x, *mats[0], c, ref, steps) for c in tries], w0.device, ref)
    for cfg, agreed in zip(tries, ok):
        if agreed:
            out[cfg] = graph_ms(lambda c=cfg: [consume(small_matmul(x, w, b, c, s, steps)) for w, b, s in mats])
    return min(out, key=out.get), out


GLU_TRIES = 6  # the fastest unsplit gate_up tiles also timed making the activation
GLU_ROWS = 16  # ... at up to this many rows: beyond, the activation kernel is a small part of a step


def tune_glu(mats, report: list, table: dict, rows: Sequence[int], activation: str, dtype, steps: int | None):
    """Where gate_up's product may make the activation itself (`small_matmul(glu=...)`): for each
    batch of `rows` up to GLU_ROWS with gate_up and down timings in `report` (`tune`'s), the GLU_TRIES fastest
    unsplit gate_up tiles that take x as gate_up's chosen entry does (rounded per row or not) are
    checked and timed making the activation over every layer's weight (`mats`), plus the fastest
    down tile that takes its input as it is; kept where that sum beats gate_up + the activation
    kernel (gate_up's timings include it) + down as chosen. Returns ({(GLU_KEYS[i], rows): tile},
    timings for the log)."""
    timed = {(r["kind"], r["rows"]): r["us"] for r in report}
    found, out_report = {}, []
    for m in (r for r in rows if r <= GLU_ROWS):
        gate_up, down = timed.get(("gate_up", m)), timed.get(("down", m))
        if gate_up is None or down is None:
            continue
        plain_down = fastest_tiles(down, lambda c: x_mode(c) != X_ROUNDED_PER_ROW, 1)
        rounded = takes_rounded(table.get(("gate_up", m)))
        tries = fastest_tiles(gate_up, lambda c: (len(c) < 5 or c[4] == 1) and takes_rounded(c) == rounded, GLU_TRIES)
        if not plain_down or not tries:
            continue
        times = {"gate_up + activation kernel + down": (min(gate_up.values()) + min(down.values())) / 1e3}
        for cfg, ms in _glu_times(mats, m, tries, rounded, activation, dtype, steps).items():
            times[(cfg, plain_down[0])] = ms + down[str(plain_down[0])] / 1e3
        best = min(times, key=times.get)
        if isinstance(best, tuple):
            found.update({(GLU_KEYS[0], m): best[0], (GLU_KEYS[1], m): best[1]})
        out_report.append(report_row("glu", m, best, times))
        log.info("gate_up making the activation x%d: %s (%s)", m, out_report[-1]["chosen"], out_report[-1]["us"])
    return found, out_report


def fastest_tiles(us: dict, keep: Callable[[Config], bool], n: int) -> list[Config]:
    """The n fastest tiles (configs) of a kind's timings (`tune`'s report, keyed by str(config)) that `keep`."""
    import ast

    tiles = [(t, ast.literal_eval(c)) for c, t in us.items() if c.startswith("(")]
    return [c for _, c in sorted(tiles) if keep(c)][:n]


def _glu_times(mats, m: int, tries: list, rounded: bool, activation: str, dtype, steps: int | None) -> dict:
    """{tile: ms} of gate_up's tiles making the activation over every layer, each checked first."""
    from .fused import activate_mul
    from .qmatmul import round_rows

    w0 = mats[0][0]
    x = torch.randn(m, 1, w0.shape[1], device=w0.device, dtype=dtype)
    given = round_rows(x, w0.dtype) if rounded else x
    ref = activate_mul(reference(x, *mats[0]), activation).float()
    glu = lambda c, s=None: lambda: small_matmul(given, *mats[0][:2], c, mats[0][2], s, glu=activation)
    tol = lambda c: X8_TOLERANCE if x_mode(c) != X_AS_GIVEN else 2e-2
    ok = check_all([lambda c=c: agrees(f"glu {c}", glu(c), ref, tol(c)) for c in tries], w0.device, ref)
    times = {}
    for cfg in (c for c, agreed in zip(tries, ok) if agreed):
        glu(cfg, steps)()  # the form the step launches (PDL), compiled before its graph
        run = lambda c=cfg: [small_matmul(given, w, b, c, s, steps, glu=activation) for w, b, s in mats]
        times[cfg] = graph_ms(run)
    return times
