"""Locust load test for tritonllm (or TensorRT-LLM-style) ensembles over gRPC streaming (the
OpenAI API's user, with the same options and statistics: `openai_locustfile.py`).

    locust -f loadtests/locustfile.py --headless -u 16 -r 4 -t 60s --host 127.0.0.1:8001 \
        --model smollm2 --tokenizer build/models/smollm2 --input-mean 128 --output-mean 64 \
        --csv build/loadtest/run --html build/loadtest/report.html --slo-ttft-p99-ms 2000

Reported per request as Locust statistics: `ttft`, `itl` (mean gap of the request), `e2e` (with
output tokens as response length) and errors with their gRPC status; beside them our own
histogram (`<csv>_llm_summary.json`: ITL percentiles per gap at microsecond precision, tokens/s,
load-generator CPU) and `<csv>_llm_over_time.png`. Load shapes: LLM_SHAPE=ramp|step|spike with
LLM_USERS and LLM_DURATION_S; arrival-rate mode: --rate R (requests/s per user).
"""

from grpc.experimental import gevent as grpc_gevent

grpc_gevent.init_gevent()  # before any channel: without it the process hangs on the first stream

import itertools  # noqa: E402
import os  # noqa: E402
import queue  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
from locust import LoadTestShape, User, constant, constant_throughput, events, task  # noqa: E402
from locust import stats as locust_stats  # noqa: E402

from loadtests import prompts as prompt_sources  # noqa: E402
from loadtests.stats import LoadStats, RequestRecord, check_slos  # noqa: E402
from tritonllm.client.llm_client import (  # noqa: E402
    GenerationError,
    build_inputs,
    itl_from_chunks,
    parse_result,
    resolve_model,
)

STATS = LoadStats()
PROMPTS: list = []


@events.init_command_line_parser.add_listener
def _args(parser):
    g = parser.add_argument_group("tritonllm")
    g.add_argument("--model", default="", help="ensemble name (default: the only LLM the server serves)")
    g.add_argument("--jsonl", default="", help="prompts file ({'prompt', 'max_tokens'} a line)")
    g.add_argument("--tokenizer", default="", help="HF checkpoint dir: token-accurate synthetic prompts")
    g.add_argument("--input-mean", type=float, default=128)
    g.add_argument("--input-std", type=float, default=0)
    g.add_argument("--output-mean", type=float, default=64)
    g.add_argument("--output-std", type=float, default=0)
    g.add_argument("--prompt-count", type=int, default=512)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-stream", action="store_true", help="one response per request")
    g.add_argument("--ignore-eos", action="store_true", help="generate exactly max_tokens (benchmarking)")
    g.add_argument("--temperature", type=float, default=None, help="sent with every request (0 = greedy)")
    g.add_argument("--top-p", type=float, default=None, help="sent with every request (without it: greedy)")
    g.add_argument("--rate", type=float, default=0, help="arrival rate per user (requests/s); 0 = closed loop")
    g.add_argument("--request-timeout", type=float, default=300)
    g.add_argument("--slo-ttft-p99-ms", type=float, default=None)
    g.add_argument("--slo-itl-p99-ms", type=float, default=None)
    g.add_argument("--slo-max-error-ratio", type=float, default=None)
    g.add_argument("--console-interval", type=float, default=10.0, help="seconds between Locust's console tables")


@events.init.add_listener
def _init(environment, **_):
    o = environment.parsed_options
    locust_stats.CONSOLE_STATS_INTERVAL_SEC = o.console_interval  # headless: a table every 2 s buries the log
    if not o.model and environment.host:
        o.model = default_model(environment.host)
    global PROMPTS
    PROMPTS = (
        prompt_sources.from_jsonl(o.jsonl)
        if o.jsonl
        else prompt_sources.synthetic(
            o.prompt_count, o.input_mean, o.input_std, o.output_mean, o.output_std, o.tokenizer or None, o.seed
        )
    )
    runner = environment.runner
    if runner is None:
        return
    if hasattr(runner, "register_message") and type(runner).__name__ == "MasterRunner":
        runner.register_message("llm_records", lambda msg, **kw: _merge(msg.data))
    if type(runner).__name__ == "WorkerRunner":
        gevent.spawn(_ship_records, environment)
    gevent.spawn(_sample_cpu)


def _merge(data) -> None:
    for r in data["records"]:
        STATS.add(RequestRecord(*r))
    for k, v in data["errors"].items():
        STATS.errors[k] = STATS.errors.get(k, 0) + v
    STATS.cpu_samples.extend(data.get("cpu", []))


def _ship_records(environment) -> None:
    """Workers send their records to the master every second (and at stop)."""
    while True:
        gevent.sleep(1.0)
        _flush(environment)


def _flush(environment) -> None:
    if not STATS.records and not STATS.errors:
        return
    data = {
        "records": [(r.end, r.ttft_s, r.latency_s, r.output_tokens, r.gaps_s) for r in STATS.records],
        "errors": dict(STATS.errors),
        "cpu": list(STATS.cpu_samples),
    }
    STATS.records.clear()
    STATS.errors.clear()
    STATS.cpu_samples.clear()
    environment.runner.send_message("llm_records", data)


def _sample_cpu() -> None:
    import psutil

    proc = psutil.Process()
    proc.cpu_percent()
    while True:
        gevent.sleep(1.0)
        STATS.cpu_samples.append(proc.cpu_percent())


@events.test_stopping.add_listener
def _stopping(environment, **_):
    if type(environment.runner).__name__ == "WorkerRunner":
        _flush(environment)


def prompt_cycle(offset: int):
    """The prompts, endlessly, starting at a user's own offset (users do not march in step)."""
    k = offset % max(1, len(PROMPTS))
    return itertools.cycle(PROMPTS[k:] + PROMPTS[:k])


def fire(environment, name: str, ms: float, length: int = 0, exc: Exception | None = None) -> None:
    """One Locust statistic (ttft, itl, e2e) of a request."""
    environment.events.request.fire(
        request_type="LLM", name=name, response_time=ms, response_length=length, exception=exc, context={}
    )


def default_model(host: str) -> str:
    """The only LLM served: over gRPC from Triton's repository index, over HTTP from /v1/models."""
    if host.startswith("http"):
        import requests

        models = [m["id"] for m in requests.get(f"{host.rstrip('/')}/v1/models", timeout=30).json()["data"]]
        if len(models) != 1:
            raise SystemExit(f"{host} serves {len(models)} models ({', '.join(models)}): choose one with --model")
        return models[0]
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(host)
    try:
        return resolve_model(client, host, None)
    finally:
        client.close()


def run_title(environment) -> str:
    """The run's parameters, for the plot's title."""
    o = environment.parsed_options
    users = getattr(o, "num_users", None) or os.environ.get("LLM_USERS", "?")
    shape = f", shape {SHAPE}" if SHAPE else ""
    rate = f", {o.rate} req/s per user" if o.rate else ", closed loop"
    lengths = (
        f"prompts from {o.jsonl}"
        if o.jsonl
        else f"input {o.input_mean:.0f}+-{o.input_std:.0f} tokens, output {o.output_mean:.0f}+-{o.output_std:.0f}"
    )
    run_time = getattr(o, "run_time", None) or "-"
    stream = "stream" if not o.no_stream else "no stream"
    return f"{o.model} at {environment.host}: {users} users{shape}{rate}, run time {run_time} s, {lengths}, {stream}"


@events.quitting.add_listener
def _report(environment, **_):
    if type(environment.runner).__name__ == "WorkerRunner":
        return
    o = environment.parsed_options
    prefix = Path(o.csv_prefix) if getattr(o, "csv_prefix", None) else Path("build/loadtest/run")
    summary = STATS.write(prefix, run_title(environment))
    missed = check_slos(summary, o.slo_ttft_p99_ms, o.slo_itl_p99_ms, o.slo_max_error_ratio)
    if summary["load_generator_saturated"]:
        print(
            f"WARNING: the load generator used {summary['load_generator_cpu_percent']:.0f}% CPU: the numbers "
            "measure Locust, not the server; add workers (--processes N or --master/--worker)",
            flush=True,
        )
    print("tritonllm summary:", summary, flush=True)
    if missed:
        print("SLO missed: " + "; ".join(missed), flush=True)
        environment.process_exit_code = 1


class TritonLLMUser(User):
    """One tritonclient gRPC stream per user (a stream carries one active request)."""

    wait_time = constant(0)

    def __init__(self, environment):
        super().__init__(environment)
        o = environment.parsed_options
        if o.rate > 0:
            self.wait_time = constant_throughput(o.rate)
        self.opts = o
        self.results: queue.Queue = queue.Queue()
        self.client = None
        self.backoff = 0.1
        self.prompts = prompt_cycle(id(self))

    def _connect(self) -> None:
        import tritonclient.grpc as grpcclient

        self.client = grpcclient.InferenceServerClient(self.host or "127.0.0.1:8001")
        self.client.start_stream(callback=lambda result=None, error=None: self.results.put((result, error)))

    def _disconnect(self) -> None:
        if self.client is not None:  # closed explicitly: __del__ under gevent can hang at exit
            try:
                self.client.stop_stream(cancel_requests=True)
                self.client.close()
            except Exception:  # already broken
                pass
            self.client = None

    def on_stop(self):
        self._disconnect()

    def _fire(self, name: str, ms: float, length: int = 0, exc: Exception | None = None) -> None:
        fire(self.environment, name, ms, length, exc)

    @task
    def generate(self):
        import tritonclient.grpc as grpcclient

        prompt = next(self.prompts)
        if self.client is None:
            self._connect()
        params = {
            "max_tokens": prompt.max_tokens,
            "stream": not self.opts.no_stream,
            "ignore_eos": self.opts.ignore_eos or None,
            "temperature": self.opts.temperature,
            "top_p": self.opts.top_p,
        }
        t0 = time.perf_counter()
        try:
            self.client.async_stream_infer(
                self.opts.model, build_inputs(grpcclient, prompt.text, params), enable_empty_final_response=True
            )
            times, counts = self._collect(t0)
        except GenerationError as exc:
            STATS.error(exc.status or "ERROR")
            self._fire("e2e", (time.perf_counter() - t0) * 1e3, 0, exc)
            if exc.status in (None, "UNAVAILABLE", "INTERNAL", "STREAM"):
                self._disconnect()  # a dead stream must be restarted, with backoff
                gevent.sleep(self.backoff)
                self.backoff = min(self.backoff * 2, 5.0)
            return
        self.backoff = 0.1
        self._record(t0, times, counts)

    def _collect(self, t0: float):
        times, counts = [], []
        while True:
            try:
                result, error = self.results.get(timeout=self.opts.request_timeout)
            except queue.Empty:
                raise GenerationError(f"no response in {self.opts.request_timeout}s", "DEADLINE_EXCEEDED") from None
            if error is not None:
                err = GenerationError.from_triton(error)
                if "no longer in valid state" in str(err):
                    err.status = "STREAM"
                raise err
            chunk = parse_result(result)
            if chunk.num_output_tokens and (not counts or chunk.num_output_tokens > counts[-1]):
                times.append(time.perf_counter())
                counts.append(chunk.num_output_tokens)
            if chunk.final:
                return times, counts

    def _record(self, t0: float, times: list[float], counts: list[int]) -> None:
        end = time.perf_counter()
        gaps = itl_from_chunks(times, counts)
        ttft = (times[0] - t0) if times else end - t0
        tokens = counts[-1] if counts else 0
        STATS.add(RequestRecord(time.time(), ttft, end - t0, tokens, gaps))
        self._fire("ttft", ttft * 1e3)
        if gaps:
            self._fire("itl", sum(gaps) / len(gaps) * 1e3)
        self._fire("e2e", (end - t0) * 1e3, tokens)


SHAPE = os.environ.get("LLM_SHAPE", "")
if SHAPE:

    class LLMLoadShape(LoadTestShape):
        """ramp: 0 -> N users over the duration; step: N/4 more every quarter; spike: N/4, then N in
        the middle third, then N/4 again. N = LLM_USERS, duration = LLM_DURATION_S."""

        users = int(os.environ.get("LLM_USERS", "16"))
        duration = float(os.environ.get("LLM_DURATION_S", "60"))

        def tick(self):
            t, n, d = self.get_run_time(), self.users, self.duration
            if t > d:
                return None
            if SHAPE == "ramp":
                return max(1, int(n * t / d)), max(1.0, n / 10)
            if SHAPE == "step":
                return max(1, int(n * (1 + int(4 * t / d)) / 4)), float(n)
            if SHAPE == "spike":
                return (n if d / 3 <= t < 2 * d / 3 else max(1, n // 4)), float(n)
            raise ValueError(f"LLM_SHAPE={SHAPE!r}: use ramp, step or spike")
