"""Sync and asyncio clients over tritonclient.grpc streaming.

Decoupled models refuse unary infer, so every request, streamed or not, goes through the gRPC
stream (as with TensorRT-LLM). An error message is terminal: after it no final response follows."""

from __future__ import annotations

import contextlib
import queue
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import numpy as np

from ..tensors import SCALAR_INPUTS

_TAG = re.compile(r"\[(?:StatusCode\.)?([A-Z_]+)\]\s*")
_ENSEMBLE_PREFIX = re.compile(r"^in ensemble '[^']*', ")


class GenerationError(RuntimeError):
    """The server refused or failed the request; `status` is the gRPC status name when known.
    str() is "[STATUS] message", the status named once."""

    def __init__(self, message: str, status: str | None = None):
        super().__init__(f"[{status}] {message}" if status else message)
        self.status, self.message = status, message

    @classmethod
    def from_triton(cls, err) -> GenerationError:
        """gRPC status when the call failed; inside a stream only the message exists, so the
        status is read from its "[STATUS]" tag (tritonllm models tag every error they send). The
        tag and Triton's "in ensemble '<name>', " prefix are taken out of the message."""
        status = err.status() if hasattr(err, "status") else None
        msg = (err.message() if hasattr(err, "message") else str(err)) or repr(err)
        tag = _TAG.search(msg)
        if tag:
            status = status or tag.group(1)
            msg = msg[: tag.start()] + msg[tag.end() :]
        msg = _ENSEMBLE_PREFIX.sub("", msg.strip())
        return cls(msg, status.replace("StatusCode.", "") if status else None)


def unreachable(url: str) -> GenerationError:
    return GenerationError(
        f"no Triton server answers at {url}: start one (make serve) or pass its gRPC address (--url host:port)",
        "UNAVAILABLE",
    )


def served_llms(client) -> list[str]:
    """The LLMs a server's repository serves: ensembles `<name>` whose `<name>_engine` is there too."""
    return llms_among(served_models(client))


def served_models(client) -> set[str]:
    return {m.name for m in client.get_model_repository_index().models}


def llms_among(names: set[str]) -> list[str]:
    return sorted(n for n in names if f"{n}_engine" in names)


def resolve_model(client, url: str, model: str | None) -> str:
    """`model`, checked against the server's repository, or the one LLM it serves when None."""
    try:
        names = served_models(client)
    except Exception as exc:  # any RPC failure here means the server is not there to ask
        raise unreachable(url) from exc
    llms = llms_among(names)
    if model is None:
        if len(llms) != 1:
            raise GenerationError(
                f"the server at {url} serves {len(llms)} LLMs ({', '.join(llms) or 'none'}): choose one with --model",
                "INVALID_ARGUMENT",
            )
        return llms[0]
    if model not in names:
        raise GenerationError(
            f"model {model!r} is not served at {url}; LLMs there: {', '.join(llms) or 'none'}", "NOT_FOUND"
        )
    return model


@dataclass
class Chunk:
    text: str
    final: bool
    finish_reason: str = ""
    num_input_tokens: int = 0
    num_output_tokens: int = 0
    num_reused_tokens: int = 0
    at: float = field(default_factory=time.perf_counter)
    logprobs: list[float] = field(default_factory=list)  # with return_log_probs: one per new token
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # with top_logprobs: per new token
    cum_logprob: float | None = None


@dataclass
class GenerationResult:
    text: str
    finish_reason: str
    num_input_tokens: int
    num_output_tokens: int
    ttft_s: float
    latency_s: float
    chunk_times: list[float]
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    cum_logprob: float | None = None
    num_reused_tokens: int = 0  # prompt tokens the engine's prefix cache held


def build_inputs(grpcclient, prompt: str, params: dict) -> list:
    text = grpcclient.InferInput("text_input", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[prompt.encode("utf-8")]], dtype=object))
    inputs = [text]
    for name in ("stop_words", "bad_words"):
        words = params.pop(name, None)
        if words:
            t = grpcclient.InferInput(name, [1, len(words)], "BYTES")
            t.set_data_from_numpy(np.array([[w.encode("utf-8") for w in words]], dtype=object))
            inputs.append(t)
    return inputs + scalar_tensors(grpcclient, params)


def scalar_tensors(grpcclient, params: dict) -> list:
    """A [1, 1] input of its wire type (`tensors.SCALAR_INPUTS`) for each parameter that is set."""
    out = []
    for name, value in params.items():
        if value is None:
            continue
        if name not in SCALAR_INPUTS:
            raise TypeError(
                f"unknown generation parameter {name!r}; known: {sorted(SCALAR_INPUTS)} + stop_words, bad_words"
            )
        triton_type, np_type = SCALAR_INPUTS[name]
        t = grpcclient.InferInput(name, [1, 1], triton_type)
        t.set_data_from_numpy(np.array([[value]], dtype=np_type))
        out.append(t)
    return out


def parse_result(result) -> Chunk:
    def first(name, default):
        arr = result.as_numpy(name)
        return default if arr is None or arr.size == 0 else arr.reshape(-1)[0]

    params = result.get_response().parameters
    final = bool(params["triton_final_response"].bool_param) if "triton_final_response" in params else False
    text = first("text_output", b"")
    reason = first("finish_reason", b"")
    chunk = Chunk(
        text.decode("utf-8") if isinstance(text, bytes) else str(text),
        final,
        reason.decode() if isinstance(reason, bytes) else str(reason),
        int(first("num_input_tokens", 0)),
        int(first("num_output_tokens", 0)),
        int(first("num_reused_tokens", 0)),
    )
    chunk.logprobs, chunk.top_logprobs, chunk.cum_logprob = read_logprobs(result)
    return chunk


def read_logprobs(result) -> tuple[list[float], list[list[tuple[int, float]]], float | None]:
    """A response's log-probability outputs (present where the request set return_log_probs): one
    per new token, the (id, log-probability) alternatives per new token, and the running sum."""
    lps = result.as_numpy("output_log_probs")
    if lps is None:
        return [], [], None
    logprobs = lps.reshape(-1).tolist()
    cum = result.as_numpy("cum_log_probs")
    ids, vals = result.as_numpy("top_log_prob_ids"), result.as_numpy("top_log_probs")
    top = []
    if ids is not None and logprobs:
        k = ids.size // len(logprobs)
        pairs = list(zip(ids.reshape(-1).tolist(), vals.reshape(-1).tolist()))
        top = [pairs[i * k : (i + 1) * k] for i in range(len(logprobs))]
    return logprobs, top, None if cum is None else float(cum.reshape(-1)[0])


def itl_from_chunks(times: list[float], cumulative_tokens: list[int]) -> list[float]:
    """Per-token gaps: a chunk carrying k tokens after a gap g counts as k gaps of g/k."""
    out = []
    for (t0, n0), (t1, n1) in zip(zip(times, cumulative_tokens), zip(times[1:], cumulative_tokens[1:])):
        k = max(n1 - n0, 1)
        out += [(t1 - t0) / k] * k
    return out


def collect(chunks, started: float) -> GenerationResult:
    parts, times, last, logprobs, top, cum = [], [], None, [], [], None
    for c in chunks:
        if c.text:
            parts.append(c.text)
            times.append(c.at)
        logprobs += c.logprobs
        top += c.top_logprobs
        cum = c.cum_logprob if c.cum_logprob is not None else cum
        last = c
    end = time.perf_counter()
    return GenerationResult(
        "".join(parts),
        last.finish_reason if last else "",
        last.num_input_tokens if last else 0,
        last.num_output_tokens if last else 0,
        (times[0] - started) if times else end - started,
        end - started,
        times,
        logprobs,
        top,
        cum,
        last.num_reused_tokens if last else 0,
    )


class LLMClient:
    """One gRPC stream per client; requests on one client run one at a time (use one client per
    concurrent caller). `model` is the ensemble name (or `<name>_engine`-style direct models);
    None: the one LLM the server serves (an error lists them when there are several)."""

    def __init__(self, url: str = "127.0.0.1:8001", model: str | None = None, timeout_s: float = 300.0):
        import tritonclient.grpc as grpcclient

        self._g = grpcclient
        self.url, self.timeout_s = url, timeout_s
        self.client = grpcclient.InferenceServerClient(url)
        self.model = model if model is not None else resolve_model(self.client, url, None)
        self._q: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._started = False

    def _callback(self, result=None, error=None):
        self._q.put((result, error))

    def _ensure_stream(self) -> None:
        if not self._started:
            self.client.start_stream(callback=self._callback)
            self._started = True

    def stream(self, prompt: str, **params) -> Iterator[Chunk]:
        """Yield chunks (text deltas) until the final one; closing the iterator early cancels."""
        with self._lock:
            self._ensure_stream()
            params.setdefault("stream", True)
            inputs = build_inputs(self._g, prompt, params)
            try:
                self.client.async_stream_infer(
                    self.model, inputs, request_id=uuid.uuid4().hex, enable_empty_final_response=True
                )
            except self._g.InferenceServerException as exc:  # the stream died (server gone): restart next time
                self._reset_stream()
                raise self._stream_error(exc) from None
            done = False
            try:
                while not done:
                    try:
                        result, error = self._q.get(timeout=self.timeout_s)
                    except queue.Empty:
                        raise GenerationError(f"no response within {self.timeout_s}s", "DEADLINE_EXCEEDED") from None
                    if error is not None:
                        done = True
                        self._reset_stream()  # after an error the stream may be dead: a fresh one next time
                        raise self._stream_error(error)
                    chunk = parse_result(result)
                    done = chunk.final
                    yield chunk
            finally:
                if not done:
                    self.cancel()

    def generate(self, prompt: str, **params) -> GenerationResult:
        started = time.perf_counter()
        params.setdefault("stream", False)
        return collect(self.stream(prompt, **params), started)

    def _stream_error(self, error) -> GenerationError:
        """The request's error; a broken stream to a server that does not answer says so."""
        err = GenerationError.from_triton(error)
        if err.status in ("UNAVAILABLE", "CANCELLED", None) and not self._live():
            return unreachable(self.url)
        if err.status == "NOT_FOUND" or "unknown model" in err.message.lower():
            resolve_model(self.client, self.url, self.model)  # raises, naming the LLMs served, if the name is unknown
        return err

    def _live(self) -> bool:
        try:
            return self.client.is_server_live()
        except self._g.InferenceServerException:
            return False

    def cancel(self) -> None:
        """Cancel whatever is in flight on this client's stream (closes the stream)."""
        self._reset_stream()

    def _reset_stream(self) -> None:
        if self._started:
            self._started = False
            with contextlib.suppress(self._g.InferenceServerException):  # already dead
                self.client.stop_stream(cancel_requests=True)
        self._q = queue.Queue()

    def close(self) -> None:
        self._reset_stream()
        self.client.close()

    def __enter__(self) -> LLMClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncLLMClient:
    """asyncio client: every request gets its own gRPC stream, so many can run concurrently."""

    def __init__(self, url: str, model: str, timeout_s: float = 300.0):
        import tritonclient.grpc as grpcclient
        import tritonclient.grpc.aio as aioclient

        self._g = grpcclient
        self.model, self.timeout_s = model, timeout_s
        self.client = aioclient.InferenceServerClient(url)

    async def stream(self, prompt: str, **params) -> AsyncIterator[Chunk]:
        params.setdefault("stream", True)
        inputs = build_inputs(self._g, prompt, params)

        async def requests():
            yield {
                "model_name": self.model,
                "inputs": inputs,
                "request_id": uuid.uuid4().hex,
                "enable_empty_final_response": True,
            }

        async for result, error in self.client.stream_infer(requests(), stream_timeout=self.timeout_s):
            if error is not None:
                raise GenerationError.from_triton(error)
            chunk = parse_result(result)
            yield chunk
            if chunk.final:
                return

    async def generate(self, prompt: str, **params) -> GenerationResult:
        started = time.perf_counter()
        params.setdefault("stream", False)
        chunks = [c async for c in self.stream(prompt, **params)]
        return collect(chunks, started)

    async def close(self) -> None:
        await self.client.close()
