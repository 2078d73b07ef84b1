"""Our own latency record beside Locust's (Locust rounds percentiles to whole ms, 10 ms steps above
100 ms): per-request TTFT, per-gap inter-token latency, tokens; time series; SLO checks; plots."""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class RequestRecord:
    end: float
    ttft_s: float
    latency_s: float
    output_tokens: int
    gaps_s: list[float]


@dataclass
class LoadStats:
    records: list[RequestRecord] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    cpu_samples: list[float] = field(default_factory=list)

    def add(self, rec: RequestRecord) -> None:
        self.records.append(rec)

    def error(self, status: str) -> None:
        self.errors[status] = self.errors.get(status, 0) + 1

    def summary(self) -> dict:
        gaps = np.array([g for r in self.records for g in r.gaps_s]) if self.records else np.array([])
        ttft = np.array([r.ttft_s for r in self.records])
        # from the first request's start: a distributed master exists long before its workers send load
        first = min((r.end - r.latency_s for r in self.records), default=self.started)
        wall = (max((r.end for r in self.records), default=first) - first) or 1e-9
        n_err = sum(self.errors.values())
        q = lambda a, p: round(float(np.percentile(a, p)) * 1e3, 3) if a.size else None
        cpu = float(np.mean(self.cpu_samples)) if self.cpu_samples else None
        return {
            "requests": len(self.records),
            "errors": self.errors,
            "error_ratio": n_err / max(1, n_err + len(self.records)),
            "output_tokens": int(sum(r.output_tokens for r in self.records)),
            "tokens_per_s": round(sum(r.output_tokens for r in self.records) / wall, 2),
            "ttft_p50_ms": q(ttft, 50),
            "ttft_p90_ms": q(ttft, 90),
            "ttft_p99_ms": q(ttft, 99),
            "itl_p50_ms": q(gaps, 50),
            "itl_p90_ms": q(gaps, 90),
            "itl_p99_ms": q(gaps, 99),
            "itl_mean_ms": round(float(gaps.mean()) * 1e3, 3) if gaps.size else None,
            "load_generator_cpu_percent": cpu,
            "load_generator_saturated": bool(cpu is not None and cpu > 85.0),
        }

    def write(self, prefix: Path, title: str = "") -> dict:
        prefix.parent.mkdir(parents=True, exist_ok=True)
        summary = self.summary()
        Path(f"{prefix}_llm_summary.json").write_text(json.dumps(summary, indent=1))
        with open(f"{prefix}_llm_requests.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["end_unix_s", "ttft_ms", "latency_ms", "output_tokens", "mean_itl_ms"])
            for r in self.records:
                w.writerow(
                    [
                        round(r.end, 3),
                        round(r.ttft_s * 1e3, 3),
                        round(r.latency_s * 1e3, 3),
                        r.output_tokens,
                        round(float(np.mean(r.gaps_s)) * 1e3, 3) if r.gaps_s else "",
                    ]
                )
        self.plot(Path(f"{prefix}_llm_over_time.png"), title)
        return summary

    def token_times(self) -> np.ndarray:
        """When each output token arrived, in seconds since the start: a request's first token at
        its TTFT, each later one after its gap (a response carrying k tokens counts k gaps)."""
        times = []
        for r in self.records:
            t = r.end - r.latency_s - self.started + r.ttft_s
            times.append(t)
            times.extend(t + np.cumsum(r.gaps_s))
        return np.sort(np.array(times))

    def plot(self, path: Path, title: str = "", window_s: float = 5.0) -> None:
        """TTFT and mean ITL per request (by its end) with a rolling median, and output tokens/s as
        a rolling rate over `window_s` seconds of token arrivals."""
        if not self.records:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ends = np.array([r.end - self.started for r in self.records])
        order = np.argsort(ends)
        ttft = np.array([r.ttft_s * 1e3 for r in self.records])[order]
        itl = np.array([np.mean(r.gaps_s) * 1e3 if r.gaps_s else np.nan for r in self.records])[order]
        ends = ends[order]
        tokens = self.token_times()
        grid = np.arange(0.0, max(tokens.max(initial=0.0), ends.max()) + 0.5, 0.5)
        fig, ax = plt.subplots(3, 1, figsize=(10, 8.5), sharex=True)
        for a, values, label in ((ax[0], ttft, "TTFT (ms)"), (ax[1], itl, "mean ITL per request (ms)")):
            a.plot(ends, values, "o", ms=4, alpha=0.35, label="request (at its end)")
            a.plot(
                grid,
                _rolling_median(ends, values, grid, window_s),
                "-",
                lw=2,
                label=f"median of the last {window_s:.0f} s",
            )
            a.set_ylabel(label)
            a.grid(alpha=0.3)
            a.legend(loc="upper right", fontsize=8)
        counted = np.searchsorted(tokens, grid, side="right") - np.searchsorted(tokens, grid - window_s, side="right")
        rate = counted / np.clip(grid, 0.5, window_s)  # the first seconds: the time elapsed, not the full window
        ax[2].plot(grid, rate, "-", lw=2)
        ax[2].set_ylabel(f"output tokens/s ({window_s:.0f} s window)")
        ax[2].set_xlabel("seconds since the load test started")
        ax[2].grid(alpha=0.3)
        s = self.summary()
        fig.suptitle(
            f"{title}\n{s['requests']} requests, {s['tokens_per_s']} tokens/s, TTFT p50 {s['ttft_p50_ms']} ms, "
            f"ITL p50 {s['itl_p50_ms']} ms, errors {s['error_ratio']:.2%}",
            fontsize=10,
        )
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def _rolling_median(at: np.ndarray, values: np.ndarray, grid: np.ndarray, window_s: float) -> np.ndarray:
    """At each grid time, the median of the values whose time `at` (sorted) lies in the window before it."""
    out = np.full(grid.shape, np.nan)
    lo, hi = np.searchsorted(at, grid - window_s, side="right"), np.searchsorted(at, grid, side="right")
    for i, (a, b) in enumerate(zip(lo, hi)):
        window = values[a:b]
        if np.isfinite(window).any():
            out[i] = np.nanmedian(window)
    return out


def check_slos(
    summary: dict, ttft_p99_ms: float | None, itl_p99_ms: float | None, max_error_ratio: float | None
) -> list[str]:
    """Missed SLOs, each as a sentence; empty when all hold."""
    missed = []
    for key, limit in (("ttft_p99_ms", ttft_p99_ms), ("itl_p99_ms", itl_p99_ms)):
        if limit is not None and (summary[key] is None or summary[key] > limit):
            missed.append(f"{key} = {summary[key]} > {limit}")
    if max_error_ratio is not None and summary["error_ratio"] > max_error_ratio:
        missed.append(f"error_ratio = {summary['error_ratio']:.4f} > {max_error_ratio}")
    return missed
