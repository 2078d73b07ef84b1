import queue
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from tritonllm.build.repository import RepositoryConfig, write_repository
from tritonllm.triton.scrape import metric_samples
from tritonllm.triton.server_process import TritonServer


@contextmanager
def serve_tiny(cfg: RepositoryConfig, tiny_dir, tiny_engine_dir, tmp_path_factory, logs: str):
    """A real Triton serving the tiny model's repository built with `cfg` (logs under build/logs/tests/)."""
    repo = tmp_path_factory.mktemp(f"{cfg.name}_repo")
    write_repository(repo, cfg, tiny_dir, tiny_engine_dir)
    with TritonServer(repo, log_dir=Path("build/logs/tests") / logs) as server:
        yield server


def metric_value(server, name: str, model: str, summed: bool = False) -> float:
    """The first sample of `name` for `model` on /metrics (a counter not yet incremented is not
    exported: 0); `summed`: every instance's sample added (the series each I/O instance exports for
    its own requests, such as TTFT)."""
    values = [v for n, labels, v in metric_samples(server.metrics()) if n == name and labels.get("model") == model]
    return sum(values) if summed else next(iter(values), 0.0)


def wait_for_metric(server, name, model, predicate, timeout_s=10.0, summed=False):
    deadline = time.monotonic() + timeout_s
    value = metric_value(server, name, model, summed)
    while time.monotonic() < deadline:
        value = metric_value(server, name, model, summed)
        if predicate(value):
            return value
        time.sleep(0.25)
    raise AssertionError(f"{name}{{model={model}}} stayed at {value}")


def engine_inputs(ids, **scalars):
    """Inputs for addressing <name>_engine directly (bypassing the ensemble)."""
    import tritonclient.grpc as g

    t = g.InferInput("input_ids", [1, len(ids)], "INT32")
    t.set_data_from_numpy(np.array([ids], dtype=np.int32))
    inputs = [t]
    for name, (dtype, value) in scalars.items():
        x = g.InferInput(name, [1, 1], dtype)
        x.set_data_from_numpy(np.array([[value]], dtype={"INT32": np.int32, "BOOL": bool, "FP32": np.float32}[dtype]))
        inputs.append(x)
    return inputs


def engine_output_ids(url: str, model: str, ids: list[int], max_tokens: int) -> list[int]:
    """Greedy ids (EOS ignored) straight from the <name>_engine model, one streamed request: the
    ensemble answers with text, its engine step with ids."""
    import tritonclient.grpc as g

    got: queue.Queue = queue.Queue()
    raw = g.InferenceServerClient(url)
    raw.start_stream(callback=lambda result=None, error=None: got.put((result, error)))
    inputs = engine_inputs(ids, max_tokens=("INT32", max_tokens), temperature=("FP32", 0.0), ignore_eos=("BOOL", True))
    raw.async_stream_infer(model, inputs)
    result, error = got.get(timeout=120)
    raw.stop_stream()
    raw.close()
    assert error is None, error
    return result.as_numpy("output_ids").reshape(-1).tolist()


def finished_by_reason(server, model: str) -> dict[str, float]:
    return {
        labels["reason"]: v
        for n, labels, v in metric_samples(server.metrics())
        if n == "tritonllm_requests_finished_total" and labels.get("model") == model
    }


def cancel_reaches_engine(server, model: str, ids: list[int]) -> None:
    """A stream to `model` (an engine) cancelled after its first token ends "cancelled". The tiny
    model can write its 200 tokens in under a second on a 2-core VM, so a loaded machine can finish
    the request before the cancel arrives: such an attempt ends "length" and is tried again; a broken
    cancel ends "length" every time and fails."""
    import tritonclient.grpc as grpcclient

    for _attempt in range(3):
        before = finished_by_reason(server, model)
        c = grpcclient.InferenceServerClient(server.grpc_url)
        got: queue.Queue = queue.Queue()
        c.start_stream(callback=lambda result=None, error=None: got.put((result, error)))
        c.async_stream_infer(
            model, engine_inputs(ids, max_tokens=("INT32", 200), stream=("BOOL", True), ignore_eos=("BOOL", True))
        )
        result, error = got.get(timeout=30)  # generating
        assert error is None, error
        c.stop_stream(cancel_requests=True)
        c.close()
        wait_for_metric(server, "tritonllm_requests_active", model, lambda v: v == 0, timeout_s=10)
        # counted finished just after its slot is freed; a new reason's series can show 0 before its count
        deadline = time.monotonic() + 10
        while sum((after := finished_by_reason(server, model)).values()) == sum(before.values()):
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if after.get("cancelled", 0) > before.get("cancelled", 0):
            return
        assert after.get("length", 0) > before.get("length", 0), f"finished counters {before} -> {after}"
    raise AssertionError("three streams cancelled after their first token all ran to their length limit")
