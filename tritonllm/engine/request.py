"""Turn one engine request's inputs into a validated `Sequence` (Triton-free: `read` is any
object with the RequestReader methods, so the in-process benchmark uses the same path)."""

from __future__ import annotations

from ..config import EngineConfig, SamplingParams
from ..errors import RequestValidationError
from ..model.shape import ModelShape
from ..text import split_id_lists
from .sampling import new_rng
from .sequence import Sequence


def sampling_params(read, cfg: EngineConfig) -> SamplingParams:
    p = SamplingParams(
        max_tokens=read.scalar("max_tokens", int, cfg.default_max_tokens),
        min_tokens=read.scalar("min_tokens", int, 0),
        temperature=read.scalar("temperature", float, 1.0),
        top_k=read.scalar("top_k", int, 0),
        top_p=read.scalar("top_p", float, 0.0),
        repetition_penalty=read.scalar("repetition_penalty", float, 1.0),
        frequency_penalty=read.scalar("frequency_penalty", float, 0.0),
        presence_penalty=read.scalar("presence_penalty", float, 0.0),
        seed=read.scalar("seed", int, None),
        end_id=read.scalar("end_id", int, None),
        pad_id=read.scalar("pad_id", int, None),
        ignore_eos=read.scalar("ignore_eos", bool, False),
        stream=read.scalar("stream", bool, False),
        stop_ids=split_id_lists(read.ints("stop_ids")),
        bad_ids=split_id_lists(read.ints("bad_ids")),
        stop_strings=read.strings("stop_words"),
        logprobs=read.scalar("return_log_probs", bool, False),
        top_logprobs=read.scalar("top_logprobs", int, 0),
    )
    return p


def build_sequence(read, cfg: EngineConfig, shape: ModelShape) -> Sequence:
    prompt = read.ints("input_ids")
    if any(not 0 <= t < shape.vocab_size for t in prompt):
        raise RequestValidationError(
            "input_ids",
            [t for t in prompt if not 0 <= t < shape.vocab_size][:5],
            f"token ids must be in 0..{shape.vocab_size - 1}",
        )
    params = sampling_params(read, cfg).validate(cfg, len(prompt), shape.vocab_size)
    stop_tokens = frozenset([params.end_id] if params.end_id is not None else shape.eos_token_ids)
    echo = not read.scalar("exclude_input_in_output", bool, True)
    return Sequence(
        prompt_ids=prompt,
        params=params,
        stop_token_ids=stop_tokens,
        rng=None if params.greedy else new_rng(params.seed),
        echo_prompt=echo,
    )


class DictReader:
    """RequestReader over a plain dict (in-process use and unit tests)."""

    def __init__(self, values: dict):
        self.values = values

    def scalar(self, name, kind, default=None):
        v = self.values.get(name)
        return default if v is None else kind(v)

    def ints(self, name):
        return [int(v) for v in self.values.get(name, [])]

    def strings(self, name):
        return list(self.values.get(name, []))
