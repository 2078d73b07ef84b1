"""How long a request waits to get into a busy engine loop's process: the engine process's request
reader (`core_process._read_commands`) shares a GIL with the loop. A feeder process sends requests
at `--rate` a second over a pipe, as the I/O side does, while the loop steps `--batch` long streams
on the torch-cuda runtime's host path (forward stubbed, so the loop holds the GIL as a loop at
a thousand streams does); reports the time from a request's send to its hand-over to the loop
(`submit`) and to its first token.

    python -m bench.profile_intake --batch 1024 --rate 800 --requests 800 [--switch-interval-ms 1] [--out results]
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import threading
import time

import numpy as np

from bench.profile_loop import VOCAB, OutboxSinks, ProfiledLoop, stubbed_torch_runtime
from bench.provenance import run_facts, write_json
from tritonllm.config import EngineConfig
from tritonllm.engine.core_process import _read_commands
from tritonllm.engine.request import DictReader, build_sequence


def _feed(conn, cfg: EngineConfig, shape, n: int, rate: float, go) -> None:
    """Send n requests, `rate` a second, each stamped with its send time (`arrival`)."""
    go.wait()
    rng, t0 = np.random.default_rng(1), time.monotonic()
    for i in range(n):
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        fields = {"input_ids": rng.integers(3, VOCAB, 128).tolist(), "max_tokens": 8, "temperature": 0.0}
        seq = build_sequence(DictReader(fields | {"ignore_eos": True, "stream": True}), cfg, shape)
        seq.arrival = time.monotonic()
        conn.send(("submit", seq))
    conn.send(("stop",))


class Stamped(ProfiledLoop):
    """The loop, noting when each fed request was handed to it."""

    handed: dict[int, float]

    def submit(self, seq) -> None:
        self.handed[seq.uid] = time.monotonic()
        super().submit(seq)


def measure(batch: int, rate: float, n: int, switch_ms: float) -> dict:
    """One run at this GIL switch interval (the process's own is restored after)."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(switch_ms / 1000.0)
    try:
        return _measure(batch, rate, n) | {"switch_interval_ms": switch_ms}
    finally:
        sys.setswitchinterval(before)


def _measure(batch: int, rate: float, n: int) -> dict:
    cfg = EngineConfig(max_slots=batch + n, max_context=512, max_tokens_limit=480, default_max_tokens=64)
    runtime = stubbed_torch_runtime(cfg)
    sinks = OutboxSinks()
    loop = Stamped(runtime, cfg, after_step=sinks.after_step)
    loop.handed = {}
    for _ in range(batch):  # the base load: long streams that keep the loop stepping throughout
        seq = build_sequence(
            DictReader({"input_ids": [1] * 16, "max_tokens": 480, "ignore_eos": True}), cfg, runtime.shape
        )
        seq.sink = sinks.new()
        loop.submit(seq)
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    go = ctx.Event()
    feeder = ctx.Process(target=_feed, args=(theirs, cfg, runtime.shape, n, rate, go), daemon=True)
    feeder.start()
    fed: dict = {}
    reader = threading.Thread(target=_read_commands, args=(ours, loop, sinks.outbox, _Routes(), fed), daemon=True)
    loop.start()
    time.sleep(0.5)  # the loop at its full batch before the first request is sent
    reader.start()
    go.set()
    reader.join(120)
    deadline = time.monotonic() + 60
    while any(s.first_token_at is None for s in fed.values()) and time.monotonic() < deadline:
        time.sleep(0.01)
    loop.stop()
    sinks.close()
    feeder.join(10)
    handed = np.array([1e3 * (loop.handed[s.uid] - s.arrival) for s in fed.values()])
    first = np.array([1e3 * (s.first_token_at - s.arrival) for s in fed.values() if s.first_token_at])
    pct = lambda a, q: round(float(np.percentile(a, q)), 2) if len(a) else None
    return {
        "batch": batch,
        "rate": rate,
        "requests": len(fed),
        "to_loop_ms_p50": pct(handed, 50),
        "to_loop_ms_p99": pct(handed, 99),
        "to_first_token_ms_p50": pct(first, 50),
        "to_first_token_ms_p99": pct(first, 99),
    }


class _Routes:
    """The hub's routes, unused here (one I/O side)."""

    routes: dict = {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--rate", type=float, default=800.0)
    p.add_argument("--requests", type=int, default=800)
    p.add_argument("--switch-interval-ms", type=float, nargs="+", default=[1.0])
    p.add_argument("--out")
    a = p.parse_args()
    rows = []
    for switch in a.switch_interval_ms:
        rows.append(measure(a.batch, a.rate, a.requests, switch))
        print(rows[-1])
    if a.out:
        write_json(a.out, "profile-intake", run_facts(rows=rows))


if __name__ == "__main__":
    main()
