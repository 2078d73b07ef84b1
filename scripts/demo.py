"""`make demo`: start Triton with the built repository, stream a chat answer to a real question
through the ensemble over gRPC, then stop the server."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from tritonllm.client import LLMClient
from tritonllm.triton.server_process import TritonServer


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repo", type=Path, default=Path("build/model_repository"))
    p.add_argument("--model", default="smollm2")
    p.add_argument("--question", default="What is the capital of France? Answer in two sentences.")
    p.add_argument("--max-tokens", type=int, default=96)
    a = p.parse_args()
    with TritonServer(a.repo, log_dir=Path("build/logs/demo")) as server:
        print(f"\nTriton is serving {a.model} on {server.grpc_url}\n\nQ: {a.question}\nA: ", end="", flush=True)
        with LLMClient(server.grpc_url, a.model) as client:
            t0 = time.perf_counter()
            last = None
            for chunk in client.stream(
                a.question, apply_chat_template=True, max_tokens=a.max_tokens, temperature=0.0, repetition_penalty=1.1
            ):
                print(chunk.text, end="", flush=True)
                last = chunk
            dt = time.perf_counter() - t0
        print(f"\n\n[{last.num_output_tokens} tokens in {dt:.2f}s, finish_reason={last.finish_reason}]")
    print("server stopped")


if __name__ == "__main__":
    main()
