"""Choosing at start-up where a decode step's products make their own input (`rows.Normed`, the
kernels in `normed.py`): for each batch of up to `normed.MAX_ROWS` rows and each product that reads
an add + norm (the next layer's qkv, gate_up or the tile making its activation, the LM head), the
add + norm kernel followed by the product's chosen tile, against the product's tiles making the
input themselves, each timed over every layer's weight as the step runs them."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from . import normed
from .fused import add_rms_norm
from .gemv import GLU_KEYS, X8_TOLERANCE, X_AS_GIVEN, dense, small_matmul, takes_rounded, x_mode
from .gemv_tuning import fastest_tiles
from .rows import Normed, float8_of
from .timing import agrees, check_all, graph_ms, report_row

log = logging.getLogger(__name__)
TRIES = 2  # tiles timed making their input: the chosen one and the next fastest of the kind's timings
EPS = 1e-5

Layers = Sequence[tuple]  # every layer's (weight as stored, bias, scale or None)


def tune(readers: dict[str, tuple[Layers, str | None]], report: list, table: dict, rows: Sequence[int], dtype,
         pdl: bool) -> tuple[dict, list]:  # fmt: skip
    """`readers`: {table key: (its layers' weights, the activation its tile makes or None)} of the
    products after an add + norm; `report` / `table`: the products' timings and choices so far
    (`gemv_tuning.tune`'s, the glu stage's). At each batch where the step would read the key (no
    fused MLP, gate_up's own key only where its tile does not make the activation), the kind's
    chosen tile and its next fastest (TRIES in all; the activation-making tile alone) are checked
    and timed making their input against the add + norm kernel + the chosen tile. Returns
    ({(normed.key(key), rows): tile} where one is faster, the timings for the log)."""
    timed = {(r["kind"], r["rows"]): r["us"] for r in report}
    found, out = {}, []
    for m in (r for r in rows if r <= normed.MAX_ROWS):
        for key, (mats, glu) in readers.items():
            if not _read_at(table, key, m):
                continue
            chosen = table[(key, m)]
            others = [] if glu else fastest_tiles(timed.get((key, m), {}), lambda c: c != chosen, TRIES - 1)
            times = _times(mats, m, chosen, [chosen, *others], glu, dtype, pdl)
            best = min(times, key=times.get)
            if isinstance(best, tuple):
                found[(normed.key(key), m)] = best
            out.append(report_row(normed.key(key), m, best, times))
            log.info("%s making its input x%d: %s (%s)", key, m, out[-1]["chosen"], out[-1]["us"])
    return found, out


def _read_at(table: dict, key: str, m: int) -> bool:
    """Whether a decode step of m rows reads `key`'s tile after an add + norm (forward.py's rule)."""
    from . import mlp

    if (mlp.KEY, m) in table or (key == "gate_up" and (GLU_KEYS[0], m) in table):
        return False
    return isinstance(table.get((key, m)), tuple)


def _times(mats: Layers, m: int, chosen, tries: list, glu: str | None, dtype, pdl: bool) -> dict:
    """{form: ms} over every layer: the add + norm kernel + `chosen`, and each of `tries` making its
    input that agrees with that form's output (their first runs compile them, with and without PDL)."""
    w0, b0, s0 = mats[0]
    k, device, steps = w0.shape[1], w0.device, 0 if pdl else None
    residual, delta = (torch.randn(m, 1, k, device=device, dtype=dtype) for _ in range(2))
    weight, out = (torch.rand(k, device=device) + 0.5).to(dtype), torch.empty_like(residual)
    fmt = float8_of(w0) if takes_rounded(chosen) else None

    def unfused(w, b, s, res=residual, p=steps):
        return small_matmul(add_rms_norm(delta, res, weight, EPS, None, fmt, pdl), w, b, chosen, s, p, glu)

    given = Normed(delta, residual, out, weight, EPS)
    made = lambda c, p=None: lambda: dense(small_matmul(given, w0, b0, c, s0, p, glu))
    ref = dense(unfused(w0, b0, s0, residual.clone(), None)).float()
    tolerance = lambda c: 2e-2 if x_mode(c) == x_mode(chosen) == X_AS_GIVEN else X8_TOLERANCE
    checks = [lambda c=c: agrees(f"{c} making its input", made(c), ref, tolerance(c)) for c in tries]
    ok = check_all(checks, device, ref)  # (before the timing below adds into the residual stream)
    times = {f"add + norm kernel + {chosen}": graph_ms(lambda: [unfused(*mat) for mat in mats])}
    for c in (c for c, agreed in zip(tries, ok) if agreed):
        made(c, steps)()  # the form the step launches (PDL), compiled before its graph
        times[c] = graph_ms(lambda c=c: [small_matmul(given, w, b, c, s, steps, glu) for w, b, s in mats])
    return times
