import time

import numpy as np

from tritonllm.triton.scrape import metric_samples


def metric_value(server, name: str, model: str) -> float:
    """The first sample of `name` for `model` on /metrics (a counter not yet incremented is not
    exported: 0)."""
    return next(
        (v for n, labels, v in metric_samples(server.metrics()) if n == name and labels.get("model") == model), 0.0
    )


def wait_for_metric(server, name, model, predicate, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    value = metric_value(server, name, model)
    while time.monotonic() < deadline:
        value = metric_value(server, name, model)
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
