"""`tritonllm-generate "prompt" --stream --max-tokens 64 [--url 127.0.0.1:8001] [--model NAME]`: one request to a
served LLM (the only one the server serves unless --model names it), its text on stdout."""

from __future__ import annotations

import argparse
import sys

from .llm_client import GenerationError, LLMClient


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("prompt")
    p.add_argument("--url", default="127.0.0.1:8001")
    p.add_argument("--model", help="the LLM (ensemble) name; default: the one LLM the server serves")
    p.add_argument("--stream", action="store_true")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop word (repeatable)")
    p.add_argument("--timeout", type=float, default=300.0)
    a = p.parse_args(argv)
    params = dict(
        max_tokens=a.max_tokens,
        temperature=a.temperature,
        top_k=a.top_k,
        top_p=a.top_p,
        seed=a.seed,
        stop_words=a.stop,
        apply_chat_template=a.chat or None,
    )
    try:
        client = LLMClient(a.url, a.model, timeout_s=a.timeout)
    except GenerationError as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
    with client:
        try:
            if a.stream:
                last = None
                for chunk in client.stream(a.prompt, **params):
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
                    last = chunk
                sys.stdout.write("\n")
                sys.stderr.write(f"[finish_reason={last.finish_reason} tokens={last.num_output_tokens}]\n")
            else:
                r = client.generate(a.prompt, **params)
                print(r.text)
                sys.stderr.write(
                    f"[finish_reason={r.finish_reason} tokens={r.num_output_tokens} latency={r.latency_s:.3f}s]\n"
                )
        except GenerationError as e:
            sys.stderr.write(f"error: {e}\n")
            return 1
    return 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
