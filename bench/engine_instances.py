"""One engine instance vs two in one Triton server (`tritonllm-build --engine-instances 2`; on a GPU
host the same instance group is `--gpus 0,1`): tokens/s through the ensemble at the same streams,
served side by side in one run, each engine with slots for half the streams, and how the requests
spread over the instances (with and without `instance_balance_ms`).

    python -m bench.engine_instances            (CPU: SmolLM2 fp32 on ONNX Runtime, 1 thread per engine)
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import replace
from pathlib import Path

from bench.drivers import run_triton
from bench.measure import PowerSampler, write_results
from bench.provenance import DEFAULT_OUT
from bench.workloads import smollm2_onnx
from tritonllm.build.repository import RepositoryConfig, write_repository
from tritonllm.config import EngineConfig
from tritonllm.text import TokenizerFiles
from tritonllm.triton.scrape import metric_samples
from tritonllm.triton.server_process import TritonServer

log = logging.getLogger("bench.engine_instances")


def finished_by_instance(server: TritonServer, model: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, labels, value in metric_samples(server.metrics()):
        if name == "tritonllm_requests_finished_total" and labels.get("model") == f"{model}_engine":
            out[labels["instance"]] = out.get(labels["instance"], 0.0) + value
    return out


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--requests-per-stream", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--out-len", type=int, default=64)
    p.add_argument("--out", default=DEFAULT_OUT)
    a = p.parse_args()
    ckpt, onnx_dir = smollm2_onnx()
    tok = TokenizerFiles(ckpt)
    words = tok.decode(tok.encode(Path(__file__).read_text() * 8, add_special_tokens=False))
    ids = tok.encode(words, add_special_tokens=False)
    texts = [tok.decode(ids[i * 41 : i * 41 + a.prompt_len]) for i in range(a.streams * a.requests_per_stream)]
    # each engine holds half the streams: one alone queues the rest, two can hold them all if the
    # requests spread
    engine = EngineConfig(max_slots=max(1, a.streams // 2), max_context=512, max_tokens_limit=256, threads=1)
    repo = Path("build/instances_repository")
    # name: (engine instances, instance_balance_ms); "two_unbalanced" shows where requests go without
    # the wait that makes a full instance pass new requests on
    variants = {"one": (1, 50.0), "two_unbalanced": (2, 0.0), "two": (2, 50.0)}
    for name, (n, balance) in variants.items():
        cfg = RepositoryConfig(name=name, engine=replace(engine, instance_balance_ms=balance), engine_instances=n)
        write_repository(repo, cfg, ckpt, onnx_dir)
    rows = []
    with TritonServer(repo, log_dir=Path("build/logs/instances")) as server:
        for name, (n, balance) in variants.items():
            result = run_triton(server.grpc_url, name, texts, a.streams, a.out_len, PowerSampler())
            time.sleep(1.0)  # the engines publish their counters every 0.5 s
            row = result.row()
            row.update(
                system=f"Triton, {n} engine instance{'s' * (n > 1)}, instance_balance_ms {balance:g}",
                requests_by_instance=finished_by_instance(server, name),
            )
            rows.append(row)
            log.info("%s", row)
    facts = {
        "model": "SmolLM2-135M-Instruct, ONNX Runtime fp32, 1 intra-op thread per engine",
        "workload": f"{a.streams} streams x {a.requests_per_stream} requests, {a.prompt_len} in / {a.out_len} out",
    }
    log.info("\n%s", write_results(a.out, "engine-instances", facts, rows))


if __name__ == "__main__":
    main()
