"""Measurement helpers: GPU power sampling (NVML), latency percentiles, run records."""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field

import numpy as np


class PowerSampler:
    """GPU energy over a run through NVML: the board's total-energy counter (millijoules, Volta and
    later) read at the start and end. It changes in steps (every 100 ms on the lent H200:
    scripts/nvml_energy_check.py), so runs much shorter than a second carry that granularity;
    the power reading is a trailing average, so sampling it every `period_s` is only the fallback
    where the counter is missing."""

    def __init__(self, period_s: float = 0.05, index: int = 0):
        self.period_s, self.samples, self._energy = period_s, [], None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml, self._h = pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception:  # no NVML (CPU machine): energy is reported as unavailable
            self._nvml = None
        self._stop = threading.Event()

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def memory_used_bytes(self) -> int | None:
        return self._nvml.nvmlDeviceGetMemoryInfo(self._h).used if self._nvml else None

    def _energy_mj(self) -> int | None:
        try:
            return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._h)
        except Exception:  # not supported on this board: the sampled power serves
            return None

    def __enter__(self):
        self.samples, self._stop, self._energy = [], threading.Event(), None
        if self._nvml:
            self._e0, self._t0 = self._energy_mj(), time.perf_counter()
            if self._e0 is None:  # no counter: sample the power instead
                self._t = threading.Thread(target=self._run, daemon=True)
                self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), self._nvml.nvmlDeviceGetPowerUsage(self._h) / 1000.0))
            time.sleep(self.period_s)

    def __exit__(self, *exc):
        self._stop.set()
        if self._nvml:
            e1, wall = self._energy_mj(), time.perf_counter() - self._t0
            if self._e0 is not None and e1 is not None and wall > 0:
                self._energy = ((e1 - self._e0) / 1000.0, wall)
            if self._e0 is None:
                self._t.join()

    def mean_watts(self) -> float | None:
        if self._energy:
            return self._energy[0] / self._energy[1]
        return float(np.mean([w for _, w in self.samples])) if self.samples else None

    def joules(self) -> float | None:
        if self._energy:
            return self._energy[0]
        if len(self.samples) < 2:
            return None
        t = np.array([s[0] for s in self.samples])
        w = np.array([s[1] for s in self.samples])
        return float(np.sum((w[1:] + w[:-1]) / 2 * np.diff(t)))


def pct(values, q) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


@dataclass
class RunResult:
    system: str
    concurrency: int
    requests: int
    output_tokens: int
    wall_s: float
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)
    mean_watts: float | None = None
    joules: float | None = None
    gpu_mem_gib: float | None = None
    note: str = ""

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s

    def row(self) -> dict:
        ms = lambda v: None if v is None else round(1e3 * v, 2)
        d = {k: v for k, v in asdict(self).items() if k not in ("ttft_s", "itl_s")}
        d.update(
            tokens_per_s=round(self.tokens_per_s, 1),
            ttft_p50_ms=ms(pct(self.ttft_s, 50)),
            ttft_p99_ms=ms(pct(self.ttft_s, 99)),
            itl_p50_ms=ms(pct(self.itl_s, 50)),
            itl_p99_ms=ms(pct(self.itl_s, 99)),
            tokens_per_joule=round(self.output_tokens / self.joules, 2) if self.joules else None,
        )
        return d


def markdown_table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def write_results(out_dir, name: str, facts: dict, rows: list[dict]) -> str:
    """{date}-{machine}-{name}.json and .md under out_dir: where the run came from (command, date,
    machine, commit: `provenance.run_facts`), the caller's facts and the rows as a table (the columns
    of every row, in order of first appearance). Returns the table."""
    import json

    from bench.provenance import run_facts, write_json

    facts = run_facts(**facts)
    path = write_json(out_dir, name, {**facts, "rows": rows})
    table = markdown_table(rows, list(dict.fromkeys(c for r in rows for c in r)))  # every row's columns
    path.with_suffix(".md").write_text(f"# {name}\n\n```\n{json.dumps(facts, indent=1)}\n```\n\n{table}\n")
    return table
