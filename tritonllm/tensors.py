"""Every tensor of the generated repository, defined once: dtype, dims, whether optional, default
and bounds. Model configs and docs/tensors.md's table are rendered from these lists. Names
follow NVIDIA's TensorRT-LLM ensemble so its clients and tools work unchanged."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # Triton TYPE_* suffix
    dims: tuple[int, ...]
    optional: bool = False
    doc: str = ""


def T(name, dtype, dims=(1,), optional=False, doc=""):
    return TensorSpec(name, dtype, tuple(dims), optional, doc)


# -- the ensemble (what clients send and receive) -------------------------------------------------
SAMPLING_INPUTS = [
    T(
        "max_tokens",
        "INT32",
        optional=True,
        doc="tokens to generate; default `default_max_tokens`, 1..`max_tokens_limit`; "
        "prompt + max_tokens <= `max_context`",
    ),
    T(
        "min_tokens",
        "INT32",
        optional=True,
        doc="EOS and stop words are ignored before this many tokens; default 0, 0..max_tokens",
    ),
    T(
        "temperature",
        "FP32",
        optional=True,
        doc="default 1.0; 0 = greedy; 0..100. As in TensorRT-LLM, a request samples only when it sets "
        "top_k > 1 or top_p > 0: without them it is greedy whatever the temperature",
    ),
    T("top_k", "INT32", optional=True, doc="default 0 (not set); 1 = greedy; 0..vocab size"),
    T(
        "top_p",
        "FP32",
        optional=True,
        doc="nucleus sampling; default 0 (not set); 0..1, 1 = the whole distribution",
    ),
    T("repetition_penalty", "FP32", optional=True, doc="HF-style; default 1.0 (off); (0, 10]"),
    T(
        "frequency_penalty",
        "FP32",
        optional=True,
        doc="OpenAI-style: minus this x each token's count in the output so far; default 0; [-2, 2]",
    ),
    T(
        "presence_penalty",
        "FP32",
        optional=True,
        doc="OpenAI-style: minus this for each token already in the output; default 0; [-2, 2]",
    ),
    T("seed", "UINT64", optional=True, doc="per-request random seed: same seed, same text; default random"),
    T("end_id", "INT32", optional=True, doc="token that ends generation; default the model's EOS ids"),
    T("pad_id", "INT32", optional=True, doc="accepted for compatibility (no padding is ever returned)"),
    T("ignore_eos", "BOOL", optional=True, doc="keep generating past EOS until max_tokens; default false"),
    T("stream", "BOOL", optional=True, doc="stream text deltas; default false (one response)"),
    T(
        "exclude_input_in_output",
        "BOOL",
        optional=True,
        doc="default true (TensorRT-LLM: false): a response's text is only what was generated, so streamed "
        "deltas and OpenAI-style clients need no prompt stripping; false prepends the prompt",
    ),
    T(
        "return_log_probs",
        "BOOL",
        optional=True,
        doc="return `output_log_probs` and `cum_log_probs`; default false. Log-probabilities of the distribution "
        "drawn from: after penalties and temperature, before top-k/top-p",
    ),
    T(
        "top_logprobs",
        "INT32",
        optional=True,
        doc="with return_log_probs: also the k most likely tokens at each step (`top_log_probs`, "
        "`top_log_prob_ids`); 0..20; default 0",
    ),
]
COMPAT_INPUTS = [  # sent by Triton's OpenAI frontend; the token counts are always returned
    T("return_num_input_tokens", "BOOL", optional=True, doc="accepted; `num_input_tokens` is always returned"),
    T("return_num_output_tokens", "BOOL", optional=True, doc="accepted; `num_output_tokens` is always returned"),
]
LOGPROB_OUTPUTS = [  # only in the responses of requests that set return_log_probs
    T("output_log_probs", "FP32", (-1,), doc="with return_log_probs: each new token's log-probability"),
    T("cum_log_probs", "FP32", doc="with return_log_probs: their sum over every token generated so far"),
    T(
        "top_log_probs",
        "FP32",
        (-1,),
        doc="with top_logprobs k: k log-probabilities per new token, most likely first (token-major)",
    ),
    T("top_log_prob_ids", "INT32", (-1,), doc="with top_logprobs k: the ids of `top_log_probs`"),
]
ENSEMBLE_INPUTS = [
    T(
        "text_input",
        "STRING",
        doc="the prompt (UTF-8); with apply_chat_template, a user message or a JSON list of {role, content}",
    ),
    T(
        "apply_chat_template",
        "BOOL",
        optional=True,
        doc="render the model's chat template around the prompt; default false",
    ),
    T("stop_words", "STRING", (-1,), optional=True, doc="strings that end generation; cut from the returned text"),
    T("bad_words", "STRING", (-1,), optional=True, doc="strings never generated"),
    *SAMPLING_INPUTS,
    *COMPAT_INPUTS,
]
ENSEMBLE_OUTPUTS = [
    T("text_output", "STRING", (-1,), doc="generated text (a delta per response when streaming)"),
    T("finish_reason", "STRING", doc="final response: stop, length, cancelled or timeout; empty before"),
    T("num_input_tokens", "INT32", doc="prompt tokens"),
    T("num_output_tokens", "INT32", doc="tokens generated so far"),
    T(
        "num_reused_tokens",
        "INT32",
        doc="prompt tokens whose keys/values came from the prefix cache, not computed again (0 without one)",
    ),
    *LOGPROB_OUTPUTS,
]

# -- the stages --------------------------------------------------------------------------------
# engine -> detokenizer: a response's numbers travel as one INT32 tensor: every tensor the engine
# process builds per response costs its GIL, which the engine loop shares
RESPONSE_INFO = (
    "num_context_ids",
    "is_final",
    "num_input_tokens",
    "num_output_tokens",
    "finish_reason",
    "num_reused_tokens",
)
FINISH_REASONS = ("", "stop", "length", "cancelled", "timeout", "error")  # finish_reason's code: its index here


@dataclass(frozen=True)
class ResponseInfo:
    num_context_ids: int
    is_final: bool
    num_input_tokens: int
    num_output_tokens: int
    finish_reason: str  # "" before the final response
    num_reused_tokens: int = 0

    def pack(self) -> list[int]:
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason {self.finish_reason!r} has no code: add it to FINISH_REASONS")
        return [
            self.num_context_ids,
            int(self.is_final),
            self.num_input_tokens,
            self.num_output_tokens,
            FINISH_REASONS.index(self.finish_reason),
            self.num_reused_tokens,
        ]

    @classmethod
    def unpack(cls, values: list[int]) -> ResponseInfo:
        if len(values) != len(RESPONSE_INFO) or not 0 <= values[4] < len(FINISH_REASONS):
            raise ValueError(f"response_info {values!r}: expected {len(RESPONSE_INFO)} values {RESPONSE_INFO}")
        return cls(values[0], bool(values[1]), values[2], values[3], FINISH_REASONS[values[4]], values[5])


@dataclass(frozen=True)
class LogProbs:
    """A response's log-probabilities: one per new token, the top k alternatives of each as (id,
    log-probability) pairs, and the running sum. Between the engine and the detokenizer (or the
    OpenAI gateway) they travel packed in one FP32 tensor, [cum, k, logprobs..., top values...,
    top ids...] (ids are exact in float32 below 2^24), for the engine process's GIL; the ensemble
    returns them as LOGPROB_OUTPUTS."""

    logprobs: list[float]
    top: list[list[tuple[int, float]]]
    cum: float

    def pack(self) -> list[float]:
        k = len(self.top[0]) if self.top else 0
        vals = [v for alts in self.top for _, v in alts]
        ids = [float(i) for alts in self.top for i, _ in alts]
        return [self.cum, float(k), *self.logprobs, *vals, *ids]

    @classmethod
    def unpack(cls, values: list[float]) -> LogProbs:
        cum, k = values[0], int(values[1])
        n = (len(values) - 2) // (1 + 2 * k)
        lps, vals, ids = values[2 : 2 + n], values[2 + n : 2 + n + n * k], values[2 + n + n * k :]
        top = [[(int(ids[t * k + j]), vals[t * k + j]) for j in range(k)] for t in range(n)] if k else []
        return cls(list(lps), top, cum)


TOKENIZER_INPUTS = [
    *(s for s in ENSEMBLE_INPUTS if s.name in ("text_input", "apply_chat_template", "stop_words", "bad_words")),
    *COMPAT_INPUTS,  # an ensemble input must reach a step: the tokenizer takes and ignores them
]
TOKENIZER_OUTPUTS = [T("input_ids", "INT32", (-1,)), T("stop_ids", "INT32", (-1,)), T("bad_ids", "INT32", (-1,))]
ENGINE_INPUTS = [
    T("input_ids", "INT32", (-1,)),
    T("stop_ids", "INT32", (-1,), optional=True, doc="-1 separated id lists"),
    T("bad_ids", "INT32", (-1,), optional=True, doc="-1 separated id lists"),
    T("stop_words", "STRING", (-1,), optional=True),
    *SAMPLING_INPUTS,
]
ENGINE_OUTPUTS = [  # three tensors per response (each one costs the engine process's GIL): ids, numbers, stop words
    T("output_ids", "INT32", (-1,), doc="the response's new ids preceded by `num_context_ids` ids sent before"),
    T("response_info", "INT32", (len(RESPONSE_INFO),), doc="the response's numbers, in RESPONSE_INFO order"),
    T("stop_words", "STRING", (-1,), doc="the request's stop words, passed on to the detokenizer"),
    T("log_probs", "FP32", (-1,), doc="where asked for: a response's log-probabilities in one tensor (LogProbs)"),
]
ENGINE_TEXT_OUTPUTS = ENSEMBLE_OUTPUTS  # emit_text: the engine answers with the ensemble's outputs itself
DETOKENIZER_INPUTS = [
    *ENGINE_OUTPUTS[:2],
    T("stop_words", "STRING", (-1,), optional=True),
    T("log_probs", "FP32", (-1,), optional=True),
]
DETOKENIZER_OUTPUTS = ENSEMBLE_OUTPUTS


def tensor_table() -> str:
    rows = ["| tensor | type | dims | required | meaning, default, bounds |", "|---|---|---|---|---|"]
    for direction, specs in (("in", ENSEMBLE_INPUTS), ("out", ENSEMBLE_OUTPUTS)):
        for s in specs:
            req = "output" if direction == "out" else ("no" if s.optional else "yes")
            rows.append(f"| `{s.name}` | {s.dtype} | {list(s.dims)} | {req} | {s.doc} |")
    return "\n".join(rows)


NUMPY_TYPES = {"INT32": np.int32, "FP32": np.float32, "UINT64": np.uint64, "BOOL": bool}
SCALAR_INPUTS = {  # {name: (Triton type, numpy type)} of the one-value inputs clients send as [1, 1]
    s.name: (s.dtype, NUMPY_TYPES[s.dtype]) for s in ENSEMBLE_INPUTS if s.dims == (1,) and s.dtype in NUMPY_TYPES
}
