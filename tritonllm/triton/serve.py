"""`make serve`: start Triton on loopback with a model repository, wait until ready, serve until
Ctrl-C / SIGTERM, then stop the whole process group and clean its shared memory."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path

from .server_process import TritonServer


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repo", type=Path, default=Path("build/model_repository"))
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--log-dir", type=Path, default=Path("build/logs/serve"))
    a = p.parse_args()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server = TritonServer(a.repo, a.http_port, a.grpc_port, a.metrics_port, log_dir=a.log_dir, watchdog=True)
    with server:
        logging.info(
            "serving %s: grpc %s, http %s, metrics :%d (log %s); Ctrl-C stops",
            a.repo,
            server.grpc_url,
            server.http_url,
            server.metrics_port,
            server.log_path,
        )
        while not stop.wait(1.0):
            if not server.is_alive():
                raise SystemExit(f"tritonserver died:\n{server.log_tail()}")
    logging.info("stopped")


if __name__ == "__main__":
    main()
