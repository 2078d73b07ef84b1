"""Reliability on the real server: overload beyond slots + queue, a killed engine stub."""
import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from clients import AsyncLLMClient, GenerationError, LLMClient


def test_overload_rejects_cleanly_and_every_accepted_request_finishes(live_server):
    """40 streams at once against 4 slots + a queue of 8: the excess gets UNAVAILABLE at once,
    every accepted request gets exactly its tokens and one final response, nothing hangs."""
    async def one(client, i):
        try:
            chunks = [c async for c in client.stream(f"overload {i}", max_tokens=30, temperature=0.0, ignore_eos=True)]
            finals = [c for c in chunks if c.final]
            return ("ok", len(finals), chunks[-1].num_output_tokens)
        except GenerationError as e:
            return (e.status, 0, 0)

    async def run():
        client = AsyncLLMClient(live_server.grpc_url, "tiny", timeout_s=120)
        try:
            return await asyncio.wait_for(asyncio.gather(*[one(client, i) for i in range(40)]), 180)
        finally:
            await client.close()

    results = asyncio.run(run())
    ok = [r for r in results if r[0] == "ok"]
    rejected = [r for r in results if r[0] == "UNAVAILABLE"]
    assert len(ok) + len(rejected) == 40, results
    assert rejected and len(ok) >= 12
    assert all(r[1] == 1 and r[2] == 30 for r in ok)
    with LLMClient(live_server.grpc_url, "tiny") as c:
        assert c.generate("after the storm", max_tokens=4, temperature=0.0).num_output_tokens >= 1


@pytest.fixture
def fault_server(model_repository):
    from tritonllm.server import TritonServer

    srv = TritonServer(model_repository, log_dir=Path("build/logs/tests/fault"), watchdog=True)
    srv.start()
    yield srv
    srv.stop()


@pytest.mark.skipif(not os.environ.get("TRITONLLM_FAULT_TESTS"),
                    reason="fault injection runs in `make soak` (TRITONLLM_FAULT_TESTS=1): recovery is not reliable "
                           "in 2.51, the reload can wait forever on the killed stub's stuck in-flight request")
def test_killed_engine_stub_errors_its_requests_and_the_server_recovers(fault_server):
    deadline = time.monotonic() + 30
    while not (pids := sorted(getattr(fault_server, "watched", {}).get("tiny_engine", ()))) and time.monotonic() < deadline:
        time.sleep(0.5)  # until the watchdog knows the engine's stub
    assert pids, f"no stub process found for tiny_engine: {fault_server.stub_pids()}\n{fault_server.log_tail(20)}"
    with LLMClient(fault_server.grpc_url, "tiny", timeout_s=10) as c:
        stream = c.stream("long request", max_tokens=190, temperature=0.0, ignore_eos=True)
        next(stream)
        os.kill(pids[0], signal.SIGKILL)
        killed_at = time.monotonic()
        with pytest.raises(GenerationError) as err:  # the affected request ends in an error, not a hang
            for _ in stream:
                pass
    recovered = None
    while time.monotonic() - killed_at < 120:
        try:
            with LLMClient(fault_server.grpc_url, "tiny", timeout_s=3) as c:
                if c.generate("are you back?", max_tokens=3, temperature=0.0).num_output_tokens >= 1:
                    recovered = time.monotonic() - killed_at
                    break
        except GenerationError:
            time.sleep(0.5)
    assert fault_server.is_alive()
    assert recovered is not None, f"no recovery in 120 s:\n{fault_server.log_tail()}"
    print(f"engine stub killed: in-flight request got {err.value.status}; serving again after {recovered:.1f} s; "
          f"watchdog reloads {fault_server.reloads}")


def test_walking_away_from_an_ensemble_stream_is_bounded(live_server):
    """Triton 2.51 does not forward an ensemble cancellation to the decoupled engine: measure what
    happens to the slot when the client walks away, and check that it is freed within the bound
    the request carried (max_tokens), with finish reason 'length' or 'cancelled'."""
    import queue as q

    import tritonclient.grpc as grpcclient

    from clients.llm_client import build_inputs
    from .helpers import wait_for_metric

    c = grpcclient.InferenceServerClient(live_server.grpc_url)
    got: q.Queue = q.Queue()
    c.start_stream(callback=lambda result=None, error=None: got.put(error))
    c.async_stream_infer("tiny", build_inputs(grpcclient, "walk away", dict(max_tokens=190, stream=True,
                                                                             ignore_eos=True, temperature=0.0)))
    assert got.get(timeout=30) is None
    wait_for_metric(live_server, "tritonllm_requests_active", "tiny_engine", lambda v: v >= 1, timeout_s=5)
    c.stop_stream(cancel_requests=True)
    c.close()
    walked = time.monotonic()
    wait_for_metric(live_server, "tritonllm_requests_active", "tiny_engine", lambda v: v == 0, timeout_s=30)
    freed_after = time.monotonic() - walked
    time.sleep(1.0)  # metrics are copied from the engine every 0.5 s
    reasons = [l for l in live_server.metrics().splitlines()
               if l.startswith("tritonllm_requests_finished_total") and "tiny_engine" in l]
    print(f"ensemble stream abandoned: engine slot freed after {freed_after:.2f} s (190 tokens at most; "
          f"cancellation not forwarded by Triton 2.51); finished so far: {reasons}")
    assert freed_after < 30 and reasons
