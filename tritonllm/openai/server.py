"""`tritonllm-openai`: the OpenAI-compatible API (`/v1/chat/completions`, `/v1/completions`,
`/v1/models`, `/health`) in front of a Triton serving a tritonllm repository.

    tritonllm-openai --triton 127.0.0.1:8001 --repository build/model_repository --port 9000

It needs the repository's folder (for each LLM's tokenizer files) and reaches Triton over gRPC, so
it runs beside any Triton, in the same pod or its own. Binds 127.0.0.1 unless told."""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from ..config import EngineConfig
from ..errors import RequestValidationError as FieldError
from ..triton.backend_io import model_parameters
from .engine_client import Delta, EngineClient, EngineError, TokenLogprob
from .protocol import ChatCompletionRequest, CompletionRequest, Sampling

log = logging.getLogger("tritonllm.openai")
MAX_BODY_BYTES = 4 << 20
STATUS = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "UNAVAILABLE": (503, "server_busy"),
    "NOT_FOUND": (404, "invalid_request_error"),
}
FINISH = {"stop": "stop", "length": "length", "timeout": "length", "cancelled": "stop"}


def error(status: int, message: str, kind: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


async def discover(grpc, repository: Path) -> dict[str, EngineClient]:
    """The LLMs of the repository that the server serves: `<name>_engine` with tokenizer files."""
    llms = {}
    for engine_dir in sorted(repository.glob("*_engine")):
        name, tokenizer = engine_dir.name[: -len("_engine")], engine_dir / "1" / "tokenizer"
        try:
            config = await grpc.get_model_config(engine_dir.name, as_json=True)
        except Exception as exc:  # not loaded on this server: not offered
            log.warning("skipping %s: the server does not serve it (%s)", engine_dir.name, exc)
            continue
        engine = EngineConfig.from_parameters(model_parameters(config["config"]))
        llms[name] = EngineClient(grpc, name, tokenizer, engine)
    return llms


def create_app(triton_url: str, repository: Path) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        import tritonclient.grpc.aio as aio

        app.state.grpc = aio.InferenceServerClient(triton_url)
        app.state.llms = await discover(app.state.grpc, Path(repository))
        log.info("serving %s from Triton at %s", sorted(app.state.llms), triton_url)
        yield
        await app.state.grpc.close()

    app = FastAPI(title="tritonllm OpenAI-compatible API", lifespan=lifespan)

    @app.middleware("http")
    async def body_limit(request: Request, call_next):
        if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
            return error(
                413,
                f"the request body is over {MAX_BODY_BYTES >> 20} MiB: send a shorter prompt",
                "invalid_request_error",
                "body",
            )
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            return error(400, f"the body is not valid JSON: {message}", "invalid_request_error", "body")
        return error(
            400,
            f"invalid '{'.'.join(where) or 'body'}': {message}",
            "invalid_request_error",
            where[0] if where else "body",
        )

    @app.get("/health")
    async def health(request: Request):
        try:
            ready = await request.app.state.grpc.is_server_ready()
        except Exception:  # Triton unreachable: not healthy
            ready = False
        return JSONResponse({"status": "ok" if ready else "triton not ready"}, 200 if ready else 503)

    @app.get("/v1/models")
    async def models(request: Request):
        return {
            "object": "list",
            "data": [
                {"id": n, "object": "model", "created": 0, "owned_by": "tritonllm"}
                for n in sorted(request.app.state.llms)
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        return await complete(request, body, "chat")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await complete(request, body, "text")

    return app


async def complete(request: Request, body: Sampling, kind: str):
    llm = request.app.state.llms.get(body.model)
    if llm is None:
        return error(
            404,
            f"the model '{body.model}' does not exist; models: {sorted(request.app.state.llms)}",
            "invalid_request_error",
            "model",
            "model_not_found",
        )
    field = "messages" if kind == "chat" else "prompt"
    try:
        prompt = (
            llm.chat_prompt([m.model_dump() for m in body.messages]) if kind == "chat" else llm.text_prompt(body.prompt)
        )
        if len(prompt) >= llm.engine.max_context:
            raise FieldError(
                field,
                f"<{len(prompt)} tokens>",
                f"the prompt must be shorter than the context of {llm.engine.max_context} tokens",
            )
        params = body.engine_params()
        if params["max_tokens"] is None:  # OpenAI's default: as many as the context and the engine allow
            params["max_tokens"] = min(llm.engine.max_tokens_limit, llm.engine.max_context - len(prompt))
        deltas = llm.generate(prompt, params, body.stop)
        first = await anext(deltas)
    except FieldError as exc:
        return error(400, str(exc), "invalid_request_error", exc.field)
    except EngineError as exc:
        status, kind_name = STATUS.get(exc.status, (500, "server_error"))
        param = {"text_input": field, "input_ids": field}.get(exc.field, exc.field)
        return error(status, str(exc), kind_name, param)
    out = Output(kind, body.model, body.include_usage, "return_log_probs" in params)
    if body.stream:
        return StreamingResponse(out.sse(first, deltas), media_type="text/event-stream")
    return JSONResponse(await out.whole(first, deltas))


class Output:
    """OpenAI's response objects for one request: chunks while streaming, or one completion."""

    def __init__(self, kind: str, model: str, include_usage: bool, logprobs: bool = False):
        self.kind, self.model, self.include_usage, self.logprobs = kind, model, include_usage, logprobs
        self.text_offset = 0  # completions' logprobs: where the next token's text starts
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if kind == "chat" else "text_completion"

    def _choice(
        self, text: str | None, finish: str | None, tokens: list[TokenLogprob], first: bool = False, whole: bool = False
    ) -> dict:
        logprobs = self._logprobs(tokens) if self.logprobs else None
        if self.kind == "text":
            return {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        if whole:
            message = {"role": "assistant", "content": text}
            return {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish}
        delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text else {})
        return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    def _logprobs(self, tokens: list[TokenLogprob]) -> dict:
        """OpenAI's logprobs object: chat's `content` list, or the legacy completions' columns."""
        if self.kind == "chat":
            return {
                "content": [
                    {
                        **_token(t.token, t.logprob),
                        "top_logprobs": [_token(s, v) for s, v in t.top],
                    }
                    for t in tokens
                ],
                "refusal": None,
            }
        offsets = list(itertools.accumulate((len(t.token) for t in tokens[:-1]), initial=self.text_offset))
        self.text_offset += sum(len(t.token) for t in tokens)
        return {
            "tokens": [t.token for t in tokens],
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [dict(t.top) for t in tokens],
            "text_offset": offsets if tokens else [],
        }

    def _usage(self, last: Delta) -> dict:
        return {
            "prompt_tokens": last.num_input_tokens,
            "completion_tokens": last.num_output_tokens,
            "total_tokens": last.num_input_tokens + last.num_output_tokens,
            "prompt_tokens_details": {"cached_tokens": last.num_reused_tokens},
        }

    def _object(self, choices: list, chunk: bool, usage: dict | None = None) -> dict:
        obj = {
            "id": self.id,
            "object": self.object + (".chunk" if chunk and self.kind == "chat" else ""),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if usage is not None:
            obj["usage"] = usage
        return obj

    async def whole(self, first: Delta, rest: AsyncIterator[Delta]) -> dict:
        parts, last, tokens = [first.text], first, list(first.tokens)
        async for d in rest:
            parts.append(d.text)
            tokens += d.tokens
            last = d
        finish = FINISH.get(last.finish_reason, "stop")
        choice = self._choice("".join(parts), finish, tokens, whole=True)
        return self._object([choice], False, self._usage(last))

    async def sse(self, first: Delta, rest: AsyncIterator[Delta]) -> AsyncIterator[str]:
        """Server-sent events; leaving early (the client went away) closes `rest`, which cancels the
        engine's request."""
        try:
            last, is_first = first, True
            async for d in _prepend(first, rest):
                last = d
                finish = FINISH.get(d.finish_reason) if d.finish_reason else None
                if d.text or finish or is_first or d.tokens:
                    yield _event(self._object([self._choice(d.text, finish, d.tokens, first=is_first)], True))
                is_first = False
            if self.include_usage:
                yield _event(self._object([], True, self._usage(last)))
        except EngineError as exc:  # after the 200: the error travels as an event
            yield _event({"error": {"message": str(exc), "type": "server_error", "param": None, "code": None}})
        finally:
            await rest.aclose()
        yield "data: [DONE]\n\n"


async def _prepend(first: Delta, rest: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
    yield first
    async for d in rest:
        yield d


def _token(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class Gateway:
    """The API served by uvicorn on a background thread (beside `tritonllm-serve`'s Triton, and
    in the tests); `stop()` finishes the open responses and returns."""

    def __init__(self, triton_url: str, repository: Path, host: str = "127.0.0.1", port: int = 9000):
        import uvicorn

        self.url = f"http://{host}:{port}"
        self._server = uvicorn.Server(
            uvicorn.Config(create_app(triton_url, repository), host=host, port=port, log_level="warning")
        )
        self._thread = threading.Thread(target=self._server.run, name="tritonllm-openai", daemon=True)

    def start(self, timeout_s: float = 30.0) -> Gateway:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the OpenAI gateway did not start on {self.url}")
            time.sleep(0.05)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout_s)


def main() -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--triton", default="127.0.0.1:8001", help="Triton's gRPC address")
    p.add_argument(
        "--repository",
        type=Path,
        default=Path("build/model_repository"),
        help="the model repository Triton serves (for the tokenizer files)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9000)
    a = p.parse_args()
    uvicorn.run(create_app(a.triton, a.repository), host=a.host, port=a.port, log_level="info")


if __name__ == "__main__":
    main()
