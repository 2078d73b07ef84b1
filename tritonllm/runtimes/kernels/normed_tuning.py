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
from .gemv import X8_TOLERANCE, X_AS_GIVEN, dense, small_matmul, takes_rounded, x_mode
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
    and timed making their input, each also asking L2 for its first K step before its prologue
    where `pdl`, against the add + norm kernel + the chosen tile. Returns ({(normed.key(key),
    rows): tile, and (normed.prefetch_key(key), rows): 1 where the fastest prefetches}, the
    timings for the log, by `form_label`)."""
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
            if best is not None:
                config, steps = best
                found[(normed.key(key), m)] = config
                found.update({(normed.prefetch_key(key), m): steps} if steps else {})
            labelled = {form_label(f, chosen): ms for f, ms in times.items()}
            out.append(report_row(normed.key(key), m, form_label(best, chosen), labelled))
            log.info("%s making its input x%d: %s (%s)", key, m, out[-1]["chosen"], out[-1]["us"])
    return found, out


def form_of(label: str) -> tuple | None:
    """A report label's form (`form_label`'s inverse): (tile, prefetched K steps), None for the
    add + norm kernel's."""
    import ast

    if not label.startswith("("):
        return None
    config, _, prefetch = label.partition(" + ")
    return ast.literal_eval(config), 1 if prefetch else 0


def form_label(form: tuple | None, chosen) -> str:
    """A timed form's name in the report: the add + norm kernel + the chosen tile (None), a tile
    making its input "(...)", or one that also prefetches "(...) + L2 prefetch"."""
    if form is None:
        return f"add + norm kernel + {chosen}"
    config, steps = form
    return f"{config} + L2 prefetch" if steps else str(config)


def _read_at(table: dict, key: str, m: int) -> bool:
    """Whether a decode step of m rows reads `key`'s tile after an add + norm (`normed.readers`)."""
    return key in normed.readers(table, m) and isinstance(table.get((key, m)), tuple)


def _times(mats: Layers, m: int, chosen, tries: list, glu: str | None, dtype, pdl: bool) -> dict:
    """{form: ms} over every layer: the add + norm kernel + `chosen` (form None), and each of `tries`
    making its input that agrees with that form's output ((tile, 0)), where `pdl` also asking L2
    for its first K step ((tile, 1)); their first runs compile them, with and without PDL."""
    w0, b0, s0 = mats[0]
    k, device, steps = w0.shape[1], w0.device, 0 if pdl else None
    residual, delta = (torch.randn(m, 1, k, device=device, dtype=dtype) for _ in range(2))
    weight, out = (torch.rand(k, device=device) + 0.5).to(dtype), torch.empty_like(residual)
    fmt = float8_of(w0) if takes_rounded(chosen) else None

    def unfused(w, b, s, res=residual, p=steps):
        return small_matmul(add_rms_norm(delta, res, weight, EPS, None, fmt, pdl), w, b, chosen, s, p, glu)

    forms = [Normed(delta, residual, out, weight, EPS, prefetch=ahead) for ahead in ((0, 1) if pdl else (0,))]
    ref = dense(unfused(w0, b0, s0, residual.clone(), None)).float()
    tolerance = lambda c: 2e-2 if x_mode(c) == x_mode(chosen) == X_AS_GIVEN else X8_TOLERANCE

    def check(c) -> bool:
        made = lambda: dense(small_matmul(forms[0], w0, b0, c, s0, None, glu))
        if not agrees(f"{c} making its input", made, ref, tolerance(c)):
            return False
        for x in forms:  # the forms the step launches (PDL), compiled here: several checks run at once
            small_matmul(x, w0, b0, c, s0, steps, glu)
        return True

    ok = check_all([lambda c=c: check(c) for c in tries], device, ref)  # (before the timing adds into residual)
    times = {None: graph_ms(lambda: [unfused(*mat) for mat in mats])}
    for c, x in ((c, x) for c, agreed in zip(tries, ok) if agreed for x in forms):
        run = lambda c=c, x=x: [small_matmul(x, w, b, c, s, steps, glu) for w, b, s in mats]
        times[(c, x.prefetch)] = graph_ms(run)
    return times
