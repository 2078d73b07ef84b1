"""Requests to one LLM's decoupled engine (`<name>_engine`) over Triton's gRPC stream, with the
tokenization the ensemble's tokenizer stage would do and the detokenization of its detokenizer
stage (the same functions). Addressing the engine directly is what makes cancellation work: Triton
2.51 does not forward the cancellation of an ensemble request, but closing this stream cancels the
engine's request, which frees its slot."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..client.llm_client import GenerationError, scalar_tensors
from ..config import EngineConfig
from ..tensors import LogProbs, ResponseInfo
from ..text import TokenizerFiles, encode_words, flatten_id_lists, text_delta


class EngineError(RuntimeError):
    """The engine (or Triton) refused or failed the request; `status` is the gRPC status name."""

    def __init__(self, message: str, status: str, field: str | None = None):
        super().__init__(message)
        self.status, self.field = status, field


@dataclass
class Delta:
    text: str
    num_input_tokens: int
    num_output_tokens: int
    finish_reason: str  # "" until the final response
    tokens: list[TokenLogprob] = field(default_factory=list)  # where asked for: the new tokens' log-probabilities
    num_reused_tokens: int = 0  # prompt tokens the engine's prefix cache held


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]]  # the most likely alternatives, most likely first


class EngineClient:
    """One LLM: its tokenizer files (from the repository the engine serves) and its engine's limits
    (from the engine's model config on the server)."""

    def __init__(self, grpc, name: str, tokenizer_dir: Path, engine: EngineConfig):
        self.grpc, self.name, self.engine = grpc, name, engine
        self.tok = TokenizerFiles(tokenizer_dir)

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        return self.tok.encode(self.tok.render_chat(messages), add_special_tokens=False)

    def text_prompt(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def inputs(self, prompt: list[int], params: dict, stop: list[str]) -> list:
        import tritonclient.grpc as g

        def tensor(name, array, dtype):
            t = g.InferInput(name, list(array.shape), dtype)
            t.set_data_from_numpy(array)
            return t

        out = [tensor("input_ids", np.array([prompt], dtype=np.int32), "INT32"), *scalar_tensors(g, params)]
        if stop:
            ids = flatten_id_lists(encode_words(self.tok, stop, "stop"))
            out.append(tensor("stop_ids", np.array([ids], dtype=np.int32), "INT32"))
            out.append(tensor("stop_words", np.array([[s.encode() for s in stop]], dtype=object), "BYTES"))
        return out

    async def generate(self, prompt: list[int], params: dict, stop: list[str]) -> AsyncIterator[Delta]:
        """Text deltas until the final one. Leaving the iteration early closes the gRPC stream,
        which cancels the engine's request."""
        inputs = self.inputs(prompt, {**params, "stream": True}, stop)

        async def requests():
            yield {"model_name": f"{self.name}_engine", "inputs": inputs, "request_id": uuid.uuid4().hex}

        responses = self.grpc.stream_infer(requests())
        done = False
        try:
            async for result, error in responses:
                if error is not None:
                    done = True
                    raise engine_error(error)
                ids = result.as_numpy("output_ids").reshape(-1).tolist()
                info = ResponseInfo.unpack(result.as_numpy("response_info").reshape(-1).tolist())
                text = text_delta(self.tok, ids, info.num_context_ids, info.is_final, stop)
                done = info.is_final
                tokens = self.token_logprobs(ids[info.num_context_ids :], result)
                yield Delta(
                    text,
                    info.num_input_tokens,
                    info.num_output_tokens,
                    info.finish_reason,
                    tokens,
                    info.num_reused_tokens,
                )
                if done:
                    return
        finally:
            if not done:  # the caller left early: cancelling the RPC cancels the engine's request
                responses.cancel()

    def token_logprobs(self, new_ids: list[int], result) -> list[TokenLogprob]:
        """The new tokens (their text alone) with their log-probabilities, where the request asked."""
        packed = result.as_numpy("log_probs")
        if packed is None:
            return []
        got = LogProbs.unpack(packed.reshape(-1).tolist())
        top = got.top or [[] for _ in got.logprobs]
        piece = self.tok.decode_one
        return [
            TokenLogprob(piece(t), v, [(piece(i), alt) for i, alt in alts])
            for t, v, alts in zip(new_ids, got.logprobs, top)
        ]


def engine_error(error) -> EngineError:
    """An engine error ("[STATUS] invalid 'field' = value: fix") with its status and field."""
    err = GenerationError.from_triton(error)
    field = re.search(r"invalid '(\w+)'", err.message)
    return EngineError(err.message, err.status or "INTERNAL", field.group(1) if field else None)
