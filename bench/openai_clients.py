"""The OpenAI API measured by two clients on one server in one run: NVIDIA's `aiperf` and our Locust
user (`loadtests/openai_locustfile.py`), same concurrency, lengths and duration; beside them the
gRPC Locust user on the ensemble. TTFT, ITL (per request: (end - first token) / (tokens - 1), as
aiperf defines it) and output tokens/s, and how far aiperf's numbers are from Locust's.

    python -m bench.openai_clients --aiperf /path/to/venv/bin/aiperf   (CPU: SmolLM2 on ONNX Runtime)

aiperf pulls in pandas, pyarrow, datasets and its own transformers, so it lives in its own venv
(`python -m venv V && V/bin/pip install aiperf`), never in the project's.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
from pathlib import Path

from bench.measure import write_results
from bench.provenance import DEFAULT_OUT
from bench.workloads import smollm2_onnx
from loadtests import launch
from tritonllm.build.repository import RepositoryConfig, write_repository
from tritonllm.config import EngineConfig
from tritonllm.openai.server import Gateway
from tritonllm.triton.server_process import TritonServer, free_port

log = logging.getLogger("bench.openai_clients")
BUILD = Path("build/openai_clients")


def locust_run(user_file: Path, host: str, tokenizer: Path, a, name: str) -> dict:
    prefix = BUILD / name
    args = [
        "--headless",
        "--only-summary",
        *f"-u {a.concurrency} -r {a.concurrency} -t {a.duration}s".split(),
        *("--host", host, "--model", "smollm2", "--tokenizer", str(tokenizer)),
        *("--input-mean", str(a.input_len), "--output-mean", str(a.output_len), "--ignore-eos"),
        *("--temperature", "0", "--csv", str(prefix)),
    ]
    r = subprocess.run(
        launch.command(*args, locustfile=user_file), env=launch.environment(), capture_output=True, text=True
    )
    if r.returncode != 0:
        raise RuntimeError(f"locust failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    s = json.loads(Path(f"{prefix}_llm_summary.json").read_text())
    return {
        "requests": s["requests"],
        "errors": sum(s["errors"].values()),
        "ttft_p50_ms": s["ttft_p50_ms"],
        "ttft_p90_ms": s["ttft_p90_ms"],
        "itl_mean_ms": s["itl_mean_ms"],
        "output_tokens_per_s": s["tokens_per_s"],
    }


def aiperf_run(aiperf: str, url: str, tokenizer: Path, a) -> dict:
    out = BUILD / "aiperf"
    cmd = [
        aiperf,
        "profile",
        *("--model", "smollm2", "--url", url, "--endpoint-type", "completions", "--streaming"),
        *("--concurrency", str(a.concurrency), "--benchmark-duration", str(a.duration)),
        *("--prompt-input-tokens-mean", str(a.input_len), "--prompt-output-tokens-mean", str(a.output_len)),
        *("--extra-inputs", "ignore_eos:true", "--extra-inputs", "temperature:0"),
        *("--tokenizer", str(tokenizer), "--use-server-token-count", "--use-legacy-max-tokens"),
        *("--warmup-request-count", str(a.concurrency), "--output-artifact-dir", str(out), "--ui", "none"),
        # its smallest footprint: on a small host its services compete with the server for the cores
        *("--workers-max", "1", "--record-processor-service-count", "1"),
        "--no-auto-plot",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"aiperf failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    found = sorted(out.rglob("*aiperf*.json"))
    if not found:
        raise RuntimeError(f"aiperf wrote no json under {out}: {list(out.rglob('*'))}")
    m = json.loads(found[-1].read_text())
    metrics = m.get("records", m)

    def stat(name, key):
        return round(float(metrics[name][key]), 3)

    return {
        "requests": int(stat("request_count", "avg")),
        "errors": int(metrics.get("error_request_count", {}).get("avg", 0) or 0),
        "ttft_p50_ms": stat("time_to_first_token", "p50"),
        "ttft_p90_ms": stat("time_to_first_token", "p90"),
        "itl_mean_ms": stat("inter_token_latency", "avg"),
        "output_tokens_per_s": stat("output_token_throughput", "avg"),
    }


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--aiperf", required=True, help="the aiperf executable (its own venv)")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--duration", type=int, default=40, help="seconds per client")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--out", default=DEFAULT_OUT)
    a = p.parse_args()
    ckpt, onnx_dir = smollm2_onnx()
    repo = BUILD / "repository"
    # one ONNX Runtime thread: the other core is the load generator's
    engine = EngineConfig(max_slots=max(4, a.concurrency), max_context=1024, max_tokens_limit=512, threads=1)
    write_repository(repo, RepositoryConfig(name="smollm2", engine=engine), ckpt, onnx_dir)
    rows = []
    with TritonServer(repo, log_dir=BUILD / "logs") as server:
        gw = Gateway(server.grpc_url, repo, port=free_port()).start()
        try:
            runs = {
                "Locust, OpenAI API (HTTP)": lambda: locust_run(launch.OPENAI_LOCUSTFILE, gw.url, ckpt, a, "http"),
                "aiperf, OpenAI API (HTTP)": lambda: aiperf_run(a.aiperf, gw.url, ckpt, a),
                "Locust, ensemble (gRPC)": lambda: locust_run(launch.LOCUSTFILE, server.grpc_url, ckpt, a, "grpc"),
            }
            for client, run in runs.items():
                rows.append({"client": client, **run()})
                log.info("%s", rows[-1])
        finally:
            gw.stop()
    locust = rows[0]
    for row in rows:
        row["vs Locust HTTP (ttft p50 / itl / tok/s)"] = " / ".join(
            f"{100 * (row[k] / locust[k] - 1):+.1f}%" for k in ("ttft_p50_ms", "itl_mean_ms", "output_tokens_per_s")
        )
    facts = {
        "model": "SmolLM2-135M-Instruct, ONNX Runtime fp32 (1 thread), one engine, gateway and client on the same host",
        "workload": f"{a.concurrency} concurrent streams, {a.input_len} in / {a.output_len} out (ignore_eos), "
        f"{a.duration} s per client, greedy",
    }
    log.info("\n%s", write_results(a.out, "openai-clients", facts, rows))


if __name__ == "__main__":
    main()
