"""`tritonllm-serve` (`make serve`): start Triton on loopback with a model repository and, beside
it, the OpenAI-compatible API; serve until Ctrl-C / SIGTERM, then stop the API, drain the engines,
stop Triton's whole process group and clean its shared memory."""

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
    p.add_argument("--openai-port", type=int, default=9000, help="the OpenAI-compatible API (0: none)")
    a = p.parse_args()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server = TritonServer(a.repo, a.http_port, a.grpc_port, a.metrics_port, log_dir=a.log_dir, watchdog=True)
    with server:
        gateway = None
        if a.openai_port:
            from ..openai.server import Gateway

            gateway = Gateway(server.grpc_url, a.repo, port=a.openai_port).start()
            logging.info("OpenAI-compatible API on %s/v1", gateway.url)
        logging.info(
            "serving %s: grpc %s, http %s, metrics :%d (log %s); Ctrl-C stops",
            a.repo,
            server.grpc_url,
            server.http_url,
            server.metrics_port,
            server.log_path,
        )
        try:
            while not stop.wait(1.0):
                if not server.is_alive():
                    raise SystemExit(f"tritonserver died:\n{server.log_tail()}")
        finally:
            if gateway is not None:
                gateway.stop()
    logging.info("stopped")


if __name__ == "__main__":
    main()
