"""Wait until Triton's tritonllm engines hold no request (generating or queued), at most N seconds.

Triton 2.51 cannot finish a three-stage ensemble request once its shutdown has begun (the
ensemble's detokenizer steps are refused, the request stays in flight until the exit timeout), and
it does not pass a client's cancellation of an ensemble stream on to the engine, which finishes
such requests (bounded by their max_tokens). So whoever stops Triton lets them end first: the test
harness (`TritonServer.stop`) and, in Kubernetes, the pod's preStop hook, which runs this file in
the image (standard library only: the image does not install tritonllm).

    python3 /opt/tritonllm/drain.py [--metrics URL] [--timeout-s N]"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
import urllib.request
from collections.abc import Callable

log = logging.getLogger("tritonllm.drain")
_HELD = re.compile(r"^tritonllm_requests_(?:active|queued)\{[^}]*\} (\S+)$", re.M)


def engine_requests(metrics_url: str) -> float:
    """Requests the engines hold, summed over models and instances, from a /metrics page."""
    with urllib.request.urlopen(metrics_url, timeout=5) as r:
        return sum(float(v) for v in _HELD.findall(r.read().decode()))


def wait_drained(metrics_url: str, timeout_s: float, alive: Callable[[], bool] = lambda: True) -> float:
    """Poll until no engine holds a request, the server is gone or `timeout_s` passed; returns the
    requests still held (0 also when the metrics cannot be read: nothing left to wait for)."""
    deadline = time.monotonic() + timeout_s
    held = 0.0
    while time.monotonic() < deadline and alive():
        try:
            held = engine_requests(metrics_url)
        except OSError:
            return 0.0
        if not held:
            return 0.0
        time.sleep(0.25)
    return held


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--metrics", default="http://127.0.0.1:8002/metrics")
    p.add_argument("--timeout-s", type=float, default=90.0)
    p.add_argument("--settle-s", type=float, default=5.0, help="first wait for the endpoints to drop this pod")
    a = p.parse_args()
    time.sleep(a.settle_s)
    held = wait_drained(a.metrics, a.timeout_s)
    if held:
        log.warning("engines still hold %d requests after %.0f s; stopping anyway", held, a.timeout_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
