"""How much streamed load one Locust process measures correctly: Locust against the timing-reference
model (first token 50 ms, then one every 20 ms) at growing user counts, single process and with
workers. Where the measured ITL p50 leaves 20 ms (+-10 %) the load generator, not the server, is
the bottleneck. Writes a table and JSON (command, machine, date).

  python -m loadtests.ceiling --users 8 32 64 96 --workers 0 2 --out results
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import tempfile
from pathlib import Path

from bench.measure import write_results
from bench.provenance import DEFAULT_OUT
from loadtests import launch
from loadtests.timing_reference import FIRST_TOKEN_MS, INTER_TOKEN_MS, write_timing_repository

log = logging.getLogger("ceiling")


def run_locust(url: str, users: int, workers: int, seconds: int, tokens: int, prefix: Path) -> dict:
    common = ["--host", url, "--model", "timing", "--output-mean", str(tokens)]
    run = ["--headless", "--only-summary", *f"-u {users} -r {users} -t {seconds}s".split(), "--csv", str(prefix)]
    if not workers:
        subprocess.run(
            launch.command(*common, *run),
            env=launch.environment(),
            capture_output=True,
            timeout=seconds + 120,
            check=True,
        )
    else:
        from tritonllm.triton.server_process import free_port

        launch.run_distributed(
            run, common, workers, free_port(), seconds + 120, master_log=Path(f"{prefix}_master.log")
        )
    return json.loads(Path(f"{prefix}_llm_summary.json").read_text())


def main() -> None:
    from tritonllm.triton.server_process import TritonServer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, nargs="+", default=[8, 32, 64, 96])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--seconds", type=int, default=12)
    p.add_argument("--tokens", type=int, default=40, help="output tokens per request")
    p.add_argument("--out", default=DEFAULT_OUT)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    per_user = a.tokens / ((FIRST_TOKEN_MS + (a.tokens - 1) * INTER_TOKEN_MS) / 1000)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, TritonServer(write_timing_repository(Path(tmp) / "repo")) as server:
        for workers in a.workers:
            for users in a.users:
                prefix = Path(tmp) / f"u{users}w{workers}"
                s = run_locust(server.grpc_url, users, workers, a.seconds, a.tokens, prefix)
                if not s["requests"]:
                    log_tail = Path(f"{prefix}_master.log").read_text()[-2000:] if workers else ""
                    raise RuntimeError(f"no request finished with {users} users, {workers} workers\n{log_tail}")
                rows.append(
                    {
                        "users": users,
                        "workers": workers,
                        "offered_tokens_per_s": round(users * per_user, 1),
                        "measured_tokens_per_s": s["tokens_per_s"],
                        "ttft_p50_ms": s["ttft_p50_ms"],
                        "itl_p50_ms": s["itl_p50_ms"],
                        "itl_p99_ms": s["itl_p99_ms"],
                        "itl_p50_error_pct": round(100 * (s["itl_p50_ms"] / INTER_TOKEN_MS - 1), 1),
                        "load_generator_cpu_percent": s["load_generator_cpu_percent"],
                    }
                )
                log.info("%s", rows[-1])
    truth = f"first token {FIRST_TOKEN_MS:.0f} ms, then one every {INTER_TOKEN_MS:.0f} ms"
    log.info("\n%s", write_results(a.out, "locust-ceiling", {"truth": truth}, rows))


if __name__ == "__main__":
    main()
