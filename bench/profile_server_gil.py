"""Where the engine process's GIL goes while Triton serves load: runs `bench.bench_llm` with the
arguments after `--`, waits until the engine's loop steps quickly (the load phase, read from the
server's /metrics), then samples the engine's python stub with py-spy in `--gil` mode (only the
thread holding the GIL is sampled) and reports the share of wall time the GIL was held, split by
thread (engine loop, request reader, response senders, cancellation watcher, execute, ...) and by
function. `--target engine-process` samples the engine process the stub spawned instead (where the
loop and its request reader share a GIL).

  python -m bench.profile_server_gil --out results -- --device gpu --systems triton --concurrency 64 \
      --rounds 24 --client-procs 8 --detokenizer-instances 4 --out /tmp/r

Needs the py-spy binary (`pip install py-spy`; its wheel can be carried to a host without network).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bench.host_cpu import proc_stat, role_of
from bench.provenance import DEFAULT_OUT, run_facts, write_json
from tritonllm.triton.scrape import metric_samples

THREADS = {  # a thread is named by a frame its stacks pass through ("file.py:function" as py-spy names it)
    "engine loop": "loop.py:EngineLoop._run",
    "request reader (engine process)": "core_process.py:_read_commands",
    "responses in (I/O side)": "core_process.py:EngineCoreClient._receive",
    "response senders": "response_pump.py:_Worker._run",
    "cancellation watcher": "watch_cancellations",
    "execute (requests in)": ":TritonPythonModel.execute",
    "metrics": "metrics.py:",
}


def processes() -> list[tuple[int, list[str]]]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            out.append((int(pid), Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")))
        except OSError:
            continue
    return out


def engine_stub_and_metrics_port(model: str = "_engine") -> tuple[int, int] | None:
    """The first python stub of a model whose name contains `model`, and the server's metrics port."""
    stubs = (pid for pid, cmd in processes() if model in (role := role_of(cmd) or "") and role.startswith("stub "))
    stub = next(stubs, None)
    port = next(
        (int(m.group(1)) for _, cmd in processes() for c in cmd if (m := re.match(r"--metrics-port=(\d+)", c))), None
    )
    return (stub, port) if stub and port else None


def metric_sum(port: int, metric: str, model: str = "") -> float:
    """A tritonllm metric summed over the series of models whose name contains `model`."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    return sum(v for name, labels, v in metric_samples(text) if name == metric and model in labels.get("model", ""))


def engine_process_of(stub: int) -> int | None:
    """The engine process a stub spawned (the engine loop's own process), if any."""
    for pid, cmd in processes():
        if role_of(cmd) == "engine process" and (proc_stat(pid) or (None,))[0] == stub:
            return pid
    return None


def wait_for_load(min_steps_per_s: float, min_active: int, model: str, bench, timeout_s: float = 900) -> int:
    """The engine stub's pid once its loop steps at least `min_steps_per_s` with at least
    `min_active` sequences generating (the load is on), while the bench runs."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and bench.poll() is None:
        found = engine_stub_and_metrics_port(model)
        if found:
            try:
                a = metric_sum(found[1], "tritonllm_loop_steps_total", model)
                time.sleep(0.5)
                steps_per_s = (metric_sum(found[1], "tritonllm_loop_steps_total", model) - a) / 0.5
                active = metric_sum(found[1], "tritonllm_requests_active", model)
                if steps_per_s >= min_steps_per_s and active >= min_active:
                    return found[0]
            except OSError:
                pass
        time.sleep(0.2)
    raise TimeoutError("the engine never reached the load phase while the bench ran")


def summarize(raw: str, seconds: float, rate: int) -> dict:
    """py-spy raw (collapsed) stacks -> GIL-held share of wall time by thread and by function."""
    by_thread, by_function, inclusive, total = collections.Counter(), collections.Counter(), collections.Counter(), 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        names = [re.sub(r" \((.*/)?([^/]*?):\d+\)$", r" (\2)", f) for f in frames]
        joined = ";".join(re.sub(r"^(\S+) \((\S+)\)$", r"\2:\1", f) for f in names)
        by_thread[next((k for k, v in THREADS.items() if v in joined), "other")] += n
        by_function[names[-1]] += n
        for name in set(names):
            inclusive[name] += n
    wall = seconds * rate
    return {
        "samples": total,
        "gil_held_share_of_wall": round(total / wall, 3),
        "by_thread_share_of_wall": {k: round(v / wall, 3) for k, v in by_thread.most_common()},
        "top_functions_share_of_wall": {k: round(v / wall, 3) for k, v in by_function.most_common(25)},
        "top_functions_inclusive_share_of_wall": {k: round(v / wall, 3) for k, v in inclusive.most_common(40)},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--rate", type=int, default=250)
    p.add_argument("--min-steps-per-s", type=float, default=200.0)
    p.add_argument("--min-active", type=int, default=0, help="... and at least this many sequences generating")
    p.add_argument("--model", default="_engine", help="the engine model to sample (bench variants: '<variant>_engine')")
    p.add_argument(
        "--target",
        choices=["stub", "engine-process"],
        default="stub",
        help="the engine model's python stub, or the engine process it spawned (where the loop runs)",
    )
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    a = p.parse_args()
    bench = subprocess.Popen([sys.executable, "-m", "bench.bench_llm", *[x for x in a.bench_args if x != "--"]])
    raw_path = Path("/tmp/tritonllm-gil.txt")
    try:
        pid = wait_for_load(a.min_steps_per_s, a.min_active, a.model, bench)
        if a.target == "engine-process":
            pid = engine_process_of(pid) or pid  # an engine in the stub's own process: the stub
        subprocess.run(
            [
                "py-spy",
                "record",
                "--pid",
                str(pid),
                "--gil",
                "--nonblocking",
                "--rate",
                str(a.rate),
                "--duration",
                str(int(a.seconds)),
                "--format",
                "raw",
                "--output",
                str(raw_path),
            ],
            check=True,
        )
        bench.wait()
    finally:  # a failed wait or recording leaves no bench (and its server) behind
        if bench.poll() is None:
            bench.terminate()
            bench.wait()
    report = run_facts(target=a.target, pid=pid, **summarize(raw_path.read_text(), int(a.seconds), a.rate))
    write_json(a.out, "server-gil-profile", report)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
