"""Wait until Triton's tritonllm engines hold no request (generating or queued), at most N seconds:
the pod's preStop hook, so a rolling update or scale-down lets streams finish before Triton gets
SIGTERM. Triton 2.51 cannot finish a three-stage ensemble request once its shutdown has begun, so
without this wait every stream still generating would be cut. Standard library only (the image
does not install tritonllm).  python3 /opt/tritonllm/drain.py [--metrics URL] [--timeout-s N]"""

import argparse
import re
import sys
import time
import urllib.request

SAMPLE = re.compile(r"^tritonllm_requests_(?:active|queued)\{[^}]*\} (\S+)$", re.M)


def held(url: str) -> float:
    with urllib.request.urlopen(url, timeout=5) as r:
        return sum(float(v) for v in SAMPLE.findall(r.read().decode()))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--metrics", default="http://127.0.0.1:8002/metrics")
    p.add_argument("--timeout-s", type=float, default=90.0)
    p.add_argument("--settle-s", type=float, default=5.0, help="first wait for the endpoints to drop this pod")
    a = p.parse_args()
    time.sleep(a.settle_s)
    deadline = time.monotonic() + a.timeout_s
    while time.monotonic() < deadline:
        try:
            if not held(a.metrics):
                return 0
        except OSError as exc:  # nothing answers: nothing left to wait for
            print(f"drain: metrics unreadable ({exc}); stopping", file=sys.stderr)
            return 0
        time.sleep(1.0)
    print(f"drain: engines still hold requests after {a.timeout_s:.0f} s; stopping anyway", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
