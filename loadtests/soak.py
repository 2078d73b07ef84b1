"""Soak: thousands of mixed requests (streaming and not, varied lengths, cancellations) against a
fresh server with the tiny model; counts lost responses and reports server memory growth.

    python -m loadtests.soak --requests 3000 --concurrency 16     (writes build/results/{date}-cpu-soak.json)

`--kv-cache-tokens 256 --kv-policy max-utilization --topic soak-preempt` oversubscribes the KV pool
(8 slots whose sequences reach ~50 tokens in 16 blocks of 16): sequences wait for blocks and are
preempted mid-generation; the report counts both, and nothing may be lost."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import time
from pathlib import Path

import psutil

from bench.provenance import DEFAULT_OUT, run_facts, write_json
from tritonllm.build.repository import RepositoryConfig, write_repository
from tritonllm.client import AsyncLLMClient, GenerationError
from tritonllm.config import EngineConfig
from tritonllm.triton.server_process import TritonServer

log = logging.getLogger(__name__)
KV_SERIES = ("tritonllm_kv_cache_waits_total", "tritonllm_kv_cache_preemptions_total")


def server_rss_mib(server: TritonServer) -> float:
    root = psutil.Process(server._proc.pid)
    procs = [root, *root.children(recursive=True)]
    return sum(p.memory_info().rss for p in procs if p.is_running()) / 2**20


async def one(client, rng: random.Random, counts: dict) -> None:
    stream, cancel = rng.random() < 0.7, rng.random() < 0.1
    n = rng.randint(1, 40)
    try:
        got_final, i = False, 0
        async for chunk in client.stream(
            f"soak {rng.random()}",
            max_tokens=n,
            stream=stream,
            temperature=rng.choice([0.0, 0.8]),
            top_p=0.95,  # sampled where the temperature is not 0 (without top_k/top_p: greedy)
            seed=rng.randint(0, 2**31),
        ):
            i += 1
            got_final = chunk.final
            if cancel and stream and i == 2:
                counts["cancelled"] += 1
                return
        counts["ok" if got_final else "lost"] += 1
    except GenerationError as e:
        counts[f"error:{e.status}"] = counts.get(f"error:{e.status}", 0) + 1


async def soak(url: str, model: str, total: int, concurrency: int, seed: int, on_progress) -> dict:
    rng = random.Random(seed)
    counts = {"ok": 0, "lost": 0, "cancelled": 0}
    sem = asyncio.Semaphore(concurrency)
    client = AsyncLLMClient(url, model, timeout_s=120)

    async def guarded(i):
        async with sem:
            await one(client, rng, counts)
            if i % 500 == 0:
                on_progress(i)

    try:
        await asyncio.gather(*[guarded(i) for i in range(total)])
    finally:
        await client.close()
    return counts


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-cache-tokens", type=int, default=0, help="the KV pool (0: every slot at max_context)")
    p.add_argument("--kv-policy", default=EngineConfig.kv_policy)
    p.add_argument("--topic", default="soak", help="results file name: {date}-{machine}-{topic}")
    p.add_argument("--out", default=DEFAULT_OUT)
    a = p.parse_args()
    from tritonllm.build.pipeline import export_cached
    from tritonllm.model.prep import prepare_smollm2, prepare_tiny

    tiny = prepare_tiny(Path("build/models/tiny"), prepare_smollm2(Path("build/models/smollm2")))
    export_cached(tiny, Path("build/onnx/tiny"))
    repo = Path("build/soak_repository")
    cfg = EngineConfig(
        max_slots=8,
        max_context=256,
        max_queue=64,
        max_tokens_limit=200,
        threads=1,
        kv_cache_tokens=a.kv_cache_tokens,
        kv_policy=a.kv_policy,
    )
    write_repository(repo, RepositoryConfig(name="tiny", engine=cfg), tiny, Path("build/onnx/tiny"))
    with TritonServer(repo, log_dir=Path("build/logs/soak"), watchdog=True) as server:
        rss = [server_rss_mib(server)]
        t0 = time.time()
        counts = asyncio.run(
            soak(
                server.grpc_url, "tiny", a.requests, a.concurrency, a.seed, lambda i: rss.append(server_rss_mib(server))
            )
        )
        wall = time.time() - t0
        time.sleep(1.0)
        rss.append(server_rss_mib(server))
        active = server.metrics()
    report = run_facts(
        **{
            "requests": a.requests,
            "concurrency": a.concurrency,
            "wall_s": round(wall, 1),
            "outcomes": counts,
            "lost_responses": counts["lost"],
            "server_rss_mib": [round(r, 1) for r in rss],
            "rss_growth_mib": round(rss[-1] - rss[0], 1),
            "engine_active_after": [
                line for line in active.splitlines() if line.startswith("tritonllm_requests_active")
            ],
            "kv_cache_tokens": a.kv_cache_tokens,
            "kv_policy": a.kv_policy,
            "kv_counters": [line for line in active.splitlines() if line.startswith(KV_SERIES)],
        }
    )
    log.info("%s: %s", write_json(a.out, a.topic, report), json.dumps(report, indent=1))
    if counts["lost"]:
        raise SystemExit(f"{counts['lost']} responses lost")


if __name__ == "__main__":
    main()
