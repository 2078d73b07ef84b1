"""Small helpers shared by the Triton python-backend adapters: typed reads of optional inputs,
response tensors, and errors mapped to gRPC status codes. `pb` is triton_python_backend_utils."""

from __future__ import annotations

import functools

import numpy as np

from ..errors import RequestValidationError, ServerBusyError


class RequestReader:
    """Reads one request's inputs; each read names the field in its error. The inputs are listed
    once (`pb_utils.get_input_tensor_by_name` lists and scans them on every call: the engine reads
    15 optional inputs per request)."""

    def __init__(self, request):
        self.inputs = {t.name(): t for t in request.inputs()}

    def array(self, name: str) -> np.ndarray | None:
        t = self.inputs.get(name)
        return None if t is None else t.as_numpy()

    def scalar(self, name: str, kind, default=None):
        arr = self.array(name)
        if arr is None:
            return default
        if arr.size != 1:
            raise RequestValidationError(name, arr.tolist(), "send exactly one value (shape [1] or [1,1])")
        value = arr.reshape(-1)[0]
        if kind is bool:
            return bool(value)
        if kind is str:
            return decode_utf8(name, value)
        return kind(value)

    def strings(self, name: str) -> list[str]:
        arr = self.array(name)
        return [] if arr is None else [decode_utf8(name, v) for v in arr.reshape(-1)]

    def ints(self, name: str) -> list[int]:
        arr = self.array(name)
        return [] if arr is None else [int(v) for v in arr.reshape(-1)]


def decode_utf8(name: str, value) -> str:
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as e:
        fix = f"send valid UTF-8 text ({e.reason} at byte {e.start})"
        raise RequestValidationError(name, bytes(value)[:40], fix) from None


def tensor(pb, name: str, values, dtype) -> object:
    """A [1, n] output tensor (batch dimension first)."""
    if dtype is object:
        arr = _bytes_row(values)
    else:
        arr = np.asarray(values, dtype=dtype).reshape(1, -1)
    return pb.Tensor(name, arr)


def _bytes_row(values) -> np.ndarray:
    """[1, n] object array of UTF-8 bytes (Triton's BYTES)."""
    return np.array([[v.encode("utf-8") if isinstance(v, str) else v for v in values]], dtype=object)


@functools.lru_cache(maxsize=256)
def _strings_array(values: tuple[str, ...]) -> np.ndarray:
    arr = _bytes_row(values)
    arr.flags.writeable = False
    return arr


def strings_tensor(pb, name: str, values: tuple[str, ...]) -> object:
    """A [1, n] BYTES tensor of strings that repeat across responses (a request's stop words in
    every response it gets): encoded once, not per response."""
    return pb.Tensor(name, _strings_array(values))


def logprob_tensors(pb, lp) -> list:
    """The ensemble's log-probability outputs of one response (a `tensors.LogProbs`)."""
    out = [tensor(pb, "output_log_probs", lp.logprobs, np.float32), tensor(pb, "cum_log_probs", [lp.cum], np.float32)]
    if lp.top:
        out.append(tensor(pb, "top_log_probs", [v for alts in lp.top for _, v in alts], np.float32))
        out.append(tensor(pb, "top_log_prob_ids", [i for alts in lp.top for i, _ in alts], np.int32))
    return out


def error_response(pb, exc: Exception):
    """An error response. Errors inside a gRPC stream carry only a message (no status code), so
    the message starts with the status name in brackets, e.g. "[INVALID_ARGUMENT] invalid 'top_p'..."."""
    if isinstance(exc, RequestValidationError):
        code, status = pb.TritonError.INVALID_ARG, "INVALID_ARGUMENT"
    elif isinstance(exc, ServerBusyError):
        code, status = pb.TritonError.UNAVAILABLE, "UNAVAILABLE"
    else:
        code, status = pb.TritonError.INTERNAL, "INTERNAL"
    return pb.InferenceResponse(error=pb.TritonError(f"[{status}] {exc}", code))


def respond_each(pb, requests, handle) -> list:
    """One response per request: `handle(request)`'s, or its error sent to that request only."""
    responses = []
    for request in requests:
        try:
            responses.append(handle(request))
        except Exception as exc:  # bad input or a failure: this request only, the model keeps serving
            responses.append(error_response(pb, exc))
    return responses


def model_parameters(model_config: dict) -> dict[str, str]:
    return {k: v["string_value"] for k, v in model_config.get("parameters", {}).items()}
