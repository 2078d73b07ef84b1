"""The contract between the engine loop and a runtime.

A runtime owns the model's weights and KV cache and runs steps: each step is a list of
`StepInput` rows (prompt pieces and decode tokens of different sequences) and yields one row of
logits per input. What a runtime can do beyond `step()` it declares in `capabilities`, read once
by the loop; the loop never probes a runtime for methods. Optional methods a runtime does not
declare raise `NotImplementedError`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Union

import numpy as np

from ..model.shape import ModelShape

if TYPE_CHECKING:
    import torch

Logits = Union[np.ndarray, "torch.Tensor"]  # [rows, vocab]: numpy on host runtimes, a device tensor on GPU ones


class StepInput(NamedTuple):
    """One sequence's work in a step: `tokens` placed at positions start..start+len-1 of `slot`.
    A prefill piece starts at the prompt tokens already cached (0 for a whole prompt); a decode
    row is one token at start = current length, or no token when the runtime already holds it on
    the device (an overlapped step sampled it). A named tuple: the loop makes one per sequence
    per step, and a tuple is the cheapest such object."""

    slot: int
    tokens: Sequence[int]  # a list; the empty tuple where the runtime holds the token
    start: int


class Sampled(NamedTuple):
    """A token drawn for a sequence that asked for log-probabilities (`return_log_probs`): its
    log-probability and the `top_logprobs` most likely tokens' (most likely first), from the logits
    the sampler drew from (after penalties, masks and temperature, before top-k/top-p). Rows of
    other sequences are plain ids."""

    token: int
    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass(frozen=True)
class RuntimeCapabilities:
    """What the loop may ask of a runtime beyond `step()` and `describe()`."""

    overlap: bool = False  # launch()/collect(): a step is enqueued without waiting for the device,
    # and its sampled ids stay there for the next step's decode rows
    multi_step: bool = False  # launch(..., steps=n) runs n decode steps on one host pass (needs overlap)
    prompt_pieces: bool = False  # step() takes a prompt piece at any start: chunked prefill
    device_sampling: bool = False  # sample() draws each row's token where the logits are (no host copy)
    prompts_in_turn: bool = False  # a step computes its prompts one after another, each finding the prefix
    # blocks the ones before it cached (else they run as one batch, and a prompt sharing a prefix with another
    # one of the same step is held back a step to reuse it)


@dataclass(frozen=True)
class RuntimeStats:
    """Counters a runtime keeps about its own work (zeros where it does not measure them)."""

    gpu_idle_s: float = 0.0  # device idle between a step and the next one launched before it was collected
    prefill_tokens: int = 0  # prompt tokens prefilled ...
    prefill_computed_tokens: int = 0  # ... and tokens computed for them, padding to graph buckets included
    prefix_queried_tokens: int = 0  # prompt tokens looked up in a prefix cache ...
    prefix_hit_tokens: int = 0  # ... and found there (not computed again)
    kv_blocks: int = 0  # a paged cache's blocks ...
    kv_blocks_available: int = 0  # ... held by no sequence (free, or cached and evictable)
    kernel_compiles: int = 0  # kernel variants compiled after start-up (each a stall of the loop)


class Runtime(ABC):
    """Subclasses set `shape`, `max_slots` (may be fewer than configured, e.g. by memory) and
    `max_context` in their constructor, and declare `capabilities`."""

    capabilities: ClassVar[RuntimeCapabilities] = RuntimeCapabilities()
    shape: ModelShape
    max_slots: int
    max_context: int
    quantization: str = "none"  # the weights' scheme the engine files were built with (config.QUANTIZATIONS)

    @abstractmethod
    def step(self, inputs: list[StepInput]) -> Logits:
        """Run the rows and write their keys/values into the cache; return logits [len(inputs),
        vocab], the logits of each row's last token, in input order. Synchronous."""

    @abstractmethod
    def describe(self) -> dict:
        """Facts reported at start-up (runtime, device, slots, context, cache bytes, kernels)."""

    def sample(self, logits: Logits, seqs: Sequence[Any]) -> list:
        """(device_sampling) Each row's token under its sequence's sampling parameters (a `Sampled`
        where the sequence asks for log-probabilities)."""
        raise NotImplementedError(f"{type(self).__name__} does not sample on its device")

    def launch(self, inputs: list[StepInput], seqs: Sequence[Any], steps: int = 1) -> object:
        """(overlap) Enqueue one step and its sampling without waiting (or, with multi_step, `steps`
        decode steps, each sampling into the next); returns a handle for `collect`."""
        raise NotImplementedError(f"{type(self).__name__} cannot launch steps ahead")

    def collect(self, handle: object) -> list:
        """(overlap) Wait for a launched step: one id (or `Sampled`) per row, or for a multi-step launch
        a list of `steps` ids per row (the scheduler never runs several steps for a sequence that asks
        for log-probabilities)."""
        raise NotImplementedError(f"{type(self).__name__} cannot launch steps ahead")

    def stats(self) -> RuntimeStats:
        return RuntimeStats()

    def reserve_kv(self, slot: int, tokens: int, spare: int = 0) -> int:
        """Promise the sequence in (or about to take) `slot` the cache of `tokens` positions, keeping
        `spare` blocks free besides; a promise only grows. Returns the positions promised (whole
        blocks), 0 for not now (nothing changed: the sequence waits, or another is preempted).
        max_context where every slot holds max_context positions of its own."""
        return self.max_context

    def release_kv(self, slot: int) -> None:
        """The sequence in `slot` ended: its cache goes back now, before its final response is sent."""
        return None

    def cached_prompt_tokens(self, prompt: list[int]) -> int:
        """How many of a prompt's first tokens a prefix cache holds now (what its prefill would not
        compute), without taking them; 0 for a runtime without one."""
        return 0

    def prefix_block_tokens(self) -> int:
        """Tokens per block of a prefix cache (what a prompt can reuse comes in whole blocks); 0
        for a runtime without one."""
        return 0

    def reused_prompt_tokens(self, slot: int) -> int:
        """Prompt tokens of the sequence in `slot` whose keys/values a prefix cache held, so far
        (read after each of its prompt pieces is taken); 0 for a runtime without one."""
        return 0
