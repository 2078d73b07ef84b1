"""The issue's targets, checked against one benchmark run's rows (never against constants from
another run), and the markdown results file written from a run's JSON.

  python -m bench.targets results/2026-11-26-h200-bench.json     (re-renders the .md beside it)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.measure import markdown_table

TRITON = "Triton ensemble gRPC stream"
COLS = [
    "system",
    "concurrency",
    "requests",
    "output_tokens",
    "tokens_per_s",
    "ttft_p50_ms",
    "ttft_p99_ms",
    "itl_p50_ms",
    "itl_p99_ms",
    "mean_watts",
    "tokens_per_joule",
    "gpu_mem_gib",
    "note",
]


def _rate(rows: list[dict], system: str, conc: int, key: str = "tokens_per_s") -> float | None:
    """A row's `key` (tokens/s unless named) for this system at this concurrency, None where absent."""
    return next((r.get(key) for r in rows if r["system"] == system and r["concurrency"] == conc), None)


def _verdict(name: str, value: float, target: float, unit: str = "x") -> str:
    """unit "x" (a ratio) or "%" (value and target given as fractions)."""
    k, f = (100.0, "{:.1f}%") if unit == "%" else (1.0, "{:.2f}x")
    shown, goal = f.format(k * value), f.format(k * target)
    if value >= target:
        return f"- {name}: {shown} (target >= {goal}): met"
    return f"- {name}: {shown} (target >= {goal}): missed by {f.format(k * (target - value))}"


WEIGHT_FIELDS = ("'quantization'", "'quantize_lm_head'")  # a Triton variant label naming these serves other weights


def _other_weights(system: str) -> bool:
    """A Triton variant whose engine holds other weights than the bench's own (its label lists the
    EngineConfig fields it changes): the in-process engine and the roofline are not its own."""
    return any(f in system for f in WEIGHT_FIELDS)


def weight_lines(rows: list[dict], t: str, concs: list[int]) -> list[str]:
    """A Triton variant of other weights against the bench's own through Triton: issue 17's
    ratios (tokens/s >= 1.6x at one stream, tokens per joule >= 1.5x at each concurrency)."""
    out = []
    for c in concs:
        mine, base = _rate(rows, t, c), _rate(rows, TRITON, c)
        if mine and base and c == 1:
            out.append(_verdict(f"{t}, concurrency 1, x {TRITON}", mine / base, 1.6))
        j, base_j = _rate(rows, t, c, "tokens_per_joule"), _rate(rows, TRITON, c, "tokens_per_joule")
        if j and base_j:
            out.append(_verdict(f"{t}, concurrency {c}, tokens/J x {TRITON}", j / base_j, 1.5))
    return out


def target_lines(facts: dict, rows: list[dict]) -> list[str]:
    gpu = bool(facts.get("gpu"))
    hf = "HF generate (static cache)" if gpu else "HF generate"
    tritons = sorted({r["system"] for r in rows if r["system"].startswith(TRITON)})
    concs = sorted({r["concurrency"] for r in rows})
    out = []
    for t in [t for t in tritons if _other_weights(t)]:
        out += weight_lines(rows, t, concs)
    for t in [t for t in tritons if not _other_weights(t)]:
        one, inproc_max = _rate(rows, t, 1), max(concs)
        if gpu and one and facts.get("roofline_batch1_tokens_per_s"):
            out.append(
                _verdict(
                    f"{t}, concurrency 1, share of the roofline", one / facts["roofline_batch1_tokens_per_s"], 0.60, "%"
                )
            )
        if not gpu and one and _rate(rows, hf, 1):
            out.append(_verdict(f"{t}, concurrency 1, x {hf}", one / _rate(rows, hf, 1), 2.0, "x"))
        if gpu and _rate(rows, t, inproc_max) and _rate(rows, hf, inproc_max):
            out.append(
                _verdict(
                    f"{t}, concurrency {inproc_max}, x {hf}",
                    _rate(rows, t, inproc_max) / _rate(rows, hf, inproc_max),
                    3.0,
                )
            )
        for c in concs:
            if _rate(rows, t, c) and _rate(rows, "engine in-process", c):
                out.append(
                    _verdict(
                        f"{t}, concurrency {c}, share of the in-process engine",
                        _rate(rows, t, c) / _rate(rows, "engine in-process", c),
                        0.90,
                        "%",
                    )
                )
    if gpu and _rate(rows, "engine in-process", max(concs)) and _rate(rows, hf, max(concs)):
        out.append(
            _verdict(
                f"engine in-process, concurrency {max(concs)}, x {hf} (for reference)",
                _rate(rows, "engine in-process", max(concs)) / _rate(rows, hf, max(concs)),
                3.0,
            )
        )
    return out


def time_lines(facts: dict, rows: list[dict]) -> list[str]:
    """Where the time goes: the decode step's GPU time against the weight-read floor, and the
    engine loop thread's split per step (from the rows' notes: in-process, and through Triton
    from the engine's /metrics)."""
    out = []
    steps, bw = facts.get("decode_step_gpu_ms"), facts.get("copy_bandwidth_TBps")
    if steps and bw:
        floor = 1e3 * facts["weight_bytes"] / (bw * 1e12)
        out.append(
            f"- decode step GPU time (CUDA graph replay) {steps}; weight-read floor {floor:.3f} ms "
            "(`python -m bench.profile_decode` splits it further)"
        )
    out += [
        f"- {r['system']}, concurrency {r['concurrency']}: {r['note']}"
        for r in rows
        if r.get("note") and "loop ms/step" in r["note"]
    ]
    return out


def render(name: str, facts: dict, rows: list[dict]) -> str:
    targets = "\n".join(target_lines(facts, rows))
    return (
        f"# {name}\n\n```\n{json.dumps(facts, indent=1)}\n```\n\n{markdown_table(rows, COLS)}\n\n"
        f"## Targets (computed from the rows above)\n\n{targets}\n\n"
        "## Where the time goes\n\n" + "\n".join(time_lines(facts, rows)) + "\n"
    )


def main() -> None:
    path = Path(sys.argv[1])
    run = json.loads(path.read_text())
    path.with_suffix(".md").write_text(render(path.stem, run["facts"], run["results"]))
    print("\n".join(target_lines(run["facts"], run["results"])))


if __name__ == "__main__":
    main()
