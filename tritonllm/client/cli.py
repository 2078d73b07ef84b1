"""`tritonllm-generate "prompt" --stream --max-tokens 64 [--url 127.0.0.1:8001] [--model NAME]`: one request to a
served LLM (the only one the server serves unless --model names it), its text on stdout."""

from __future__ import annotations

import argparse
import sys

from ..config import SamplingParams
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
    sys.stderr.write(f"[{sampling_line(params)}]\n")
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


def sampling_line(params: dict) -> str:
    """What the server samples with for these parameters (its defaults filled in, TensorRT-LLM's rule:
    no top_k and no top_p is greedy)."""
    sp = SamplingParams(
        temperature=1.0 if params["temperature"] is None else params["temperature"],
        top_k=params["top_k"] or 0,
        top_p=params["top_p"] or 0.0,
    )
    if sp.greedy:
        why = "temperature 0" if sp.temperature == 0 else "top_k 1" if sp.top_k == 1 else "no --top-k/--top-p"
        return f"sampling: greedy ({why})"
    seed = "random" if params["seed"] is None else params["seed"]
    return f"sampling: temperature={sp.temperature:g} top_k={sp.top_k or 'off'} top_p={sp.top_p or 'off'} seed={seed}"


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
