"""The OpenAI request bodies we take (unknown fields ignored, as OpenAI does), validated with
pydantic; each bound names the field and the fix."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..config import MAX_TOP_LOGPROBS


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**64)
    stop: str | list[str] | None = Field(default=None, validate_default=True)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    user: str | None = None
    ignore_eos: bool = False  # extensions that vLLM's API also takes (benchmark clients send them)
    min_tokens: int | None = Field(default=None, ge=0)

    @field_validator("n")
    @classmethod
    def one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"n={n}: only n=1 is supported; send n separate requests")
        return n

    @field_validator("stop")
    @classmethod
    def stop_list(cls, stop):
        words = [stop] if isinstance(stop, str) else list(stop or [])
        if len(words) > 4 or any(not w for w in words):
            raise ValueError("give up to 4 non-empty stop strings")
        return words

    def engine_params(self) -> dict:
        return {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "frequency_penalty": self.frequency_penalty or None,
            "presence_penalty": self.presence_penalty or None,
            "ignore_eos": self.ignore_eos or None,
            "min_tokens": self.min_tokens,
        }

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: str


class ChatCompletionRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def top_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self

    def engine_params(self) -> dict:
        return {
            **super().engine_params(),
            "max_tokens": self.max_completion_tokens or self.max_tokens,
            **logprob_params(self.logprobs, self.top_logprobs or 0),
        }


class CompletionRequest(Sampling):
    prompt: str = Field(min_length=1)
    logprobs: int | None = Field(default=None, ge=0, le=5)  # the legacy API's bound
    echo: bool = False

    @field_validator("echo")
    @classmethod
    def no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo is not supported: send echo=false")
        return value

    def engine_params(self) -> dict:
        return {**super().engine_params(), **logprob_params(self.logprobs is not None, self.logprobs or 0)}


def logprob_params(wanted: bool, top: int) -> dict:
    return {"return_log_probs": True, "top_logprobs": top or None} if wanted else {}
