"""Two engine instances in one server (`--engine-instances 2`, the CPU form of `--gpus 0,1`):
Triton spreads the requests over both, each instance reports its own metrics, and every request
gets its tokens and one final response. Two tokenizer and detokenizer instances too: each ran its
warm-up request while loading."""

import asyncio
import time
from pathlib import Path

import tritonclient.grpc as grpcclient

from tritonllm.build.repository import RepositoryConfig, write_repository
from tritonllm.client import AsyncLLMClient
from tritonllm.config import EngineConfig
from tritonllm.triton.scrape import metric_samples
from tritonllm.triton.server_process import TritonServer


def test_two_engine_instances_share_the_requests(tiny_dir, tiny_engine_dir, tmp_path):
    engine = EngineConfig(max_slots=4, max_context=256, max_tokens_limit=128, threads=1)
    repo = write_repository(
        tmp_path / "repo",
        RepositoryConfig(
            name="tiny2", engine=engine, engine_instances=2, tokenizer_instances=2, detokenizer_instances=2
        ),
        tiny_dir,
        tiny_engine_dir,
    )

    async def burst(url):
        client = AsyncLLMClient(url, "tiny2", timeout_s=120)
        try:
            return await asyncio.gather(
                *[client.generate(f"spread {i}", max_tokens=48, temperature=0.0, ignore_eos=True) for i in range(16)]
            )
        finally:
            await client.close()

    with TritonServer(repo, log_dir=Path("build/logs/tests/instances")) as server:
        with grpcclient.InferenceServerClient(server.grpc_url) as admin:
            warmed = {
                stage: int(
                    admin.get_inference_statistics(f"tiny2_{stage}", as_json=True)["model_stats"][0]["inference_stats"][
                        "success"
                    ].get("count", 0)
                )
                for stage in ("tokenizer", "engine", "detokenizer")
            }
        t0 = time.perf_counter()
        results = asyncio.run(burst(server.grpc_url))
        wall = time.perf_counter() - t0
        time.sleep(1.2)  # counters are published every 0.5 s
        samples = metric_samples(server.metrics())
    assert warmed == {"tokenizer": 2, "engine": 0, "detokenizer": 2}  # one warm-up request in each text stage instance
    assert [r.num_output_tokens for r in results] == [48] * 16
    finished, slots = {}, {}
    for name, labels, value in samples:
        if labels.get("model") != "tiny2_engine":
            continue
        if name == "tritonllm_requests_finished_total":
            finished[labels["instance"]] = finished.get(labels["instance"], 0) + value
        elif name == "tritonllm_slots_total":
            slots[labels["instance"]] = value
    print(f"2 engine instances: {16 * 48 / wall:.0f} tokens/s, requests by instance {finished}")
    assert set(slots) == {"tiny2_engine_0_0", "tiny2_engine_0_1"} and set(slots.values()) == {4}
    assert sum(finished.values()) == 16 and min(finished.get(i, 0) for i in slots) >= 3, finished
