"""Locust against an OpenAI-compatible HTTP API (ours: `tritonllm-openai`; or vLLM's, SGLang's):
streamed /v1/completions, the options, statistics and report of `locustfile.py`.

    locust -f loadtests/openai_locustfile.py --headless -u 8 -r 8 -t 60s --host http://127.0.0.1:9000 \
        --model smollm2 --tokenizer build/models/smollm2 --input-mean 128 --output-mean 64 --ignore-eos
"""

import json
import time

from locust import User, constant, constant_throughput, task

from loadtests import locustfile as common  # its options, prompts, statistics and report (not its user)


class OpenAIUser(User):
    """The OpenAI API (`tritonllm-openai`, or any OpenAI-compatible server): streamed
    /v1/completions with usage, `--host http://127.0.0.1:9000`. Its ITL is per request, (end - first
    token) / (tokens - 1), as aiperf and vLLM's benchmark compute it (an SSE chunk does not say how
    many tokens it holds)."""

    wait_time = constant(0)

    def __init__(self, environment):
        super().__init__(environment)
        import requests

        self.opts, self.session = environment.parsed_options, requests.Session()
        if self.opts.rate > 0:
            self.wait_time = constant_throughput(self.opts.rate)
        self.prompts = common.prompt_cycle(id(self))

    @task
    def complete(self):
        prompt = next(self.prompts)
        body = {
            "model": self.opts.model,
            "prompt": prompt.text,
            "max_tokens": prompt.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": self.opts.ignore_eos,
            **({"temperature": self.opts.temperature} if self.opts.temperature is not None else {}),
            **({"top_p": self.opts.top_p} if self.opts.top_p is not None else {}),
        }
        t0 = time.perf_counter()
        try:
            first, last, tokens = self._stream(body)
        except common.GenerationError as exc:
            common.STATS.error(exc.status or "ERROR")
            common.fire(self.environment, "e2e", (time.perf_counter() - t0) * 1e3, 0, exc)
            return
        end = time.perf_counter()
        gaps = [(last - first) / (tokens - 1)] * (tokens - 1) if first and tokens > 1 else []
        ttft = (first or end) - t0
        common.STATS.add(common.RequestRecord(time.time(), ttft, end - t0, tokens, gaps))
        common.fire(self.environment, "ttft", ttft * 1e3)
        if gaps:
            common.fire(self.environment, "itl", gaps[0] * 1e3)
        common.fire(self.environment, "e2e", (end - t0) * 1e3, tokens)

    def _stream(self, body: dict) -> tuple[float | None, float | None, int]:
        """Times of the first and last text chunks and the completion's token count (its usage)."""
        url = f"{self.host.rstrip('/')}/v1/completions"
        first = last = None
        tokens = 0
        with self.session.post(url, json=body, stream=True, timeout=self.opts.request_timeout) as r:
            if r.status_code != 200:
                raise common.GenerationError(r.text[:200], f"HTTP_{r.status_code}")
            for line in r.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    raise common.GenerationError(event["error"]["message"], "STREAM")
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                if event.get("choices") and event["choices"][0].get("text"):
                    last = time.perf_counter()
                    first = first or last
        return first, last, tokens
