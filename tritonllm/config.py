"""Typed configuration, the one source of truth for model-repository values.

`EngineConfig` bounds the engine; `SamplingParams` holds one request's sampling inputs with their
defaults and bounds (the ensemble's tensors are documented from `TENSORS`)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import RequestValidationError

RUNTIMES = ("onnxruntime", "torch-cuda", "tensorrt")
DTYPES = ("float32", "float16", "bfloat16")
ENGINE_PROCESS = ("auto", "on", "off")
ORT_SPIN_AFTER_RUN = ("auto", "on", "off")
INTEGER_SCHEMES = ("int8", "int4")  # ONNX Runtime's integer products (`ort_spin_after_run` auto)
KV_CACHE_DTYPES = ("auto", "fp8")  # auto: the weights' dtype
AUTO_IO_PROCESSES = 2  # I/O processes an engine process gets by default (docs/decisions.md, 2026-12-04)
RESPONSE_ORDERS = ("ends-first", "arrival")  # the response senders' order (engine/response_pump.py)
KV_POLICIES = ("guaranteed-no-evict", "max-utilization")  # TensorRT-LLM's names for the same two policies
MAX_TOP_LOGPROBS = 20  # OpenAI's bound
QUANTIZATIONS = ("none", "fp8", "int8-wo", "int8", "int4")
# what each runtime is built for; anything else is refused at build time with what to use instead
RUNTIME_QUANTIZATIONS = {
    "onnxruntime": ("none", "int8", "int4"),
    "torch-cuda": ("none", "fp8", "int8-wo"),
    "tensorrt": ("none", "int8-wo", "int8", "fp8"),
}
QUANTIZATION_ADVICE = {
    "fp8": "fp8 needs FP8 Tensor Cores: build it for --runtime torch-cuda or tensorrt (compute capability >= 8.9)",
    "int8-wo": "int8-wo (int8 weights, 16-bit activations) is a GPU scheme: build it for --runtime torch-cuda "
    "or tensorrt",
    "int8": "int8 (integer products) is built for --runtime onnxruntime or tensorrt; on torch-cuda use int8-wo or fp8",
    "int4": "int4 (ONNX Runtime's MatMulNBits) is built for --runtime onnxruntime only; on the GPU use int8-wo or fp8",
}


def require_scheme(found: str, configured: str, what: str) -> str:
    """The quantization scheme engine files were built with (`found`), refused when the config
    says another: `what` names the files in the error."""
    if found != configured:
        raise ValueError(
            f"{what} is quantized {found!r} but the config says quantization={configured!r}: "
            f"rebuild the repository with --quantization {found}"
        )
    return found


def _check(cond: bool, name: str, value: Any, bound: str) -> None:
    if not cond:
        raise ValueError(f"config {name}={value!r} out of bounds: {bound}")


@dataclass(frozen=True)
class EngineConfig:
    runtime: str = "onnxruntime"
    max_slots: int = 8  # sequences generating at once (in-flight batch size)
    max_context: int = 2048  # prompt + generated tokens per sequence (KV cache length per slot)
    max_queue: int = 256  # requests waiting for a slot; beyond it requests are rejected
    max_tokens_limit: int = 1024  # the largest max_tokens a request may ask for
    default_max_tokens: int = 64
    request_timeout_s: float = 600.0  # a request still generating after this is ended ("timeout")
    stream_interval_ms: float = 0.0  # >0: under load, coalesce a stream's tokens for up to this long per response
    stream_coalesce_min_active: int = 8  # ... but only while at least this many sequences generate
    max_responses_per_s: float = 1000.0  # all streams together (0: no limit); beyond, responses carry several tokens
    max_prefill_tokens: int = 8192  # prompt tokens one step prefills (bounds its stall and memory); a longer
    # prompt still runs, alone
    prefill_gather_ms: float = 0.0  # >0: newcomers wait up to this x (share of slots decoding) to prefill together
    emit_text: bool = False  # the engine detokenizes (tokenizer -> engine): one python hop fewer per response
    switch_interval_ms: float = 1.0  # the engine process's GIL switch interval (Python's default: 5)
    steps_per_launch: int = 1  # GPU runtimes: decode steps launched at once (one host pass per run of steps) ...
    multi_step_min_active: int = 16  # ... while at least this many sequences decode (below, host time is hidden)
    launch_ahead: int = 1  # GPU runtimes: steps left queued on the device while the loop completes older ones
    response_threads: int = 1  # threads sending responses off the engine loop (merging under backpressure)
    response_order: str = "ends-first"  # a stream's first and final responses ahead of its mid-stream ones (what
    # TTFT and a closed-loop client's next request wait on), or "arrival": in the order the loop made them
    engine_process: str = "auto"  # Triton: "on" runs the engine loop in a child process with its own GIL (the model
    # instance keeps the request/response I/O); "auto": on for the GPU runtimes, off for ONNX Runtime on the CPU
    io_processes: int = 0  # Triton model instances sharing one engine process as its request/response I/O (each
    # with its own python stub and GIL; needs the engine process); 0 (auto): AUTO_IO_PROCESSES with the engine
    # process, else 1
    instance_balance_ms: float = 50.0  # several engine instances: a full one holds a new request this long
    # in execute() (so Triton hands the next ones to the others) before queueing it
    threads: int = 0  # runtime intra-op threads (0: runtime default)
    ort_spin_wait: bool = True  # onnxruntime: its compute threads spin between ops (ONNX Runtime's default);
    # False: they sleep, leaving the cores to the server's other processes between ops
    ort_spin_after_run: str = "auto"  # onnxruntime: "on": they go on spinning after a step's Run returns (ONNX
    # Runtime's default); "off": they stop as it returns (`session.force_spinning_stop`), spinning only within a
    # step; "auto": off for integer-quantized engines (int8, int4), whose short steps leave the most gaps to the stubs
    dtype: str = "float32"
    kv_cache_memory_fraction: float = 0.5  # GPU runtimes: share of free memory for the KV cache
    kv_cache_tokens: int = 0  # paged runtimes: tokens the KV block pool holds (0: by kv_cache_memory_fraction on
    # a GPU, every slot at max_context on the host); requests are admitted by the blocks they may fill
    tuning_cache: str = "auto"  # torch-cuda: folder of start-up kernel tables kept per GPU kind, model shape and
    # code ("auto": $XDG_CACHE_HOME or ~/.cache, under tritonllm/tuning; "off": tune at every start)
    torch_compile: bool = False  # torch-cuda: torch.compile the decode step before graph capture
    deterministic: bool = False  # torch-cuda: only kernels that add their sums in one fixed order (the fused MLP's
    # and attention + o's atomic adds are not tuned in), so the same requests give the same logits run after run
    prefix_cache: bool = True  # onnxruntime, torch-cuda: prompts reuse the cached keys/values of a prefix seen before
    kv_cache_dtype: str = "auto"  # torch-cuda: "fp8" stores keys/values as e4m3 with a scale per layer and KV head
    # (twice the tokens in the same memory; the attention kernels read them)
    kv_policy: str = "guaranteed-no-evict"  # paged runtimes: admit a sequence only with blocks for its longest
    # length (never preempted), or "max-utilization": admit with blocks for its prompt, grow step by step, and
    # preempt the youngest sequence (recomputed later) when the pool runs out
    quantization: str = "none"  # weights' scheme (QUANTIZATIONS), quantized once at build time
    quantize_lm_head: bool = False  # torch-cuda fp8 / int8-wo: the LM head too (int8, a scale per vocabulary row)

    def __post_init__(self) -> None:
        _check(self.runtime in RUNTIMES, "runtime", self.runtime, f"one of {RUNTIMES}")
        _check(1 <= self.max_slots <= 4096, "max_slots", self.max_slots, "1..4096")
        _check(16 <= self.max_context <= 1 << 20, "max_context", self.max_context, "16..1048576")
        _check(0 <= self.max_queue <= 1 << 16, "max_queue", self.max_queue, "0..65536")
        _check(
            1 <= self.max_tokens_limit < self.max_context,
            "max_tokens_limit",
            self.max_tokens_limit,
            f"1..max_context-1 ({self.max_context - 1})",
        )
        _check(
            1 <= self.default_max_tokens <= self.max_tokens_limit,
            "default_max_tokens",
            self.default_max_tokens,
            "1..max_tokens_limit",
        )
        _check(self.request_timeout_s > 0, "request_timeout_s", self.request_timeout_s, "> 0")
        _check(0 <= self.stream_interval_ms <= 10_000, "stream_interval_ms", self.stream_interval_ms, "0..10000")
        _check(
            self.max_responses_per_s == 0 or 10 <= self.max_responses_per_s <= 1e6,
            "max_responses_per_s",
            self.max_responses_per_s,
            "0 (no limit) or 10..1000000",
        )
        _check(
            self.stream_coalesce_min_active >= 1, "stream_coalesce_min_active", self.stream_coalesce_min_active, ">= 1"
        )
        _check(16 <= self.max_prefill_tokens <= 1 << 24, "max_prefill_tokens", self.max_prefill_tokens, "16..16777216")
        _check(0 <= self.prefill_gather_ms <= 1000, "prefill_gather_ms", self.prefill_gather_ms, "0..1000")
        _check(0.05 <= self.switch_interval_ms <= 100, "switch_interval_ms", self.switch_interval_ms, "0.05..100")
        _check(1 <= self.steps_per_launch <= 16, "steps_per_launch", self.steps_per_launch, "1..16")
        _check(self.multi_step_min_active >= 1, "multi_step_min_active", self.multi_step_min_active, ">= 1")
        _check(1 <= self.launch_ahead <= 4, "launch_ahead", self.launch_ahead, "1..4")
        _check(1 <= self.response_threads <= 64, "response_threads", self.response_threads, "1..64")
        _check(bool(self.tuning_cache.strip()), "tuning_cache", self.tuning_cache, '"auto", "off" or a folder')
        _check(self.response_order in RESPONSE_ORDERS, "response_order", self.response_order, "|".join(RESPONSE_ORDERS))
        _check(self.engine_process in ENGINE_PROCESS, "engine_process", self.engine_process, "|".join(ENGINE_PROCESS))
        _check(
            self.ort_spin_after_run in ORT_SPIN_AFTER_RUN,
            "ort_spin_after_run",
            self.ort_spin_after_run,
            "|".join(ORT_SPIN_AFTER_RUN),
        )
        _check(0 <= self.io_processes <= 32, "io_processes", self.io_processes, "0 (auto)..32")
        _check(
            self.io_processes <= 1 or self.separate_process,
            "io_processes",
            self.io_processes,
            "0 (auto) or 1 unless the engine runs in its own process (engine_process on, or auto with a GPU runtime)",
        )
        _check(0 <= self.instance_balance_ms <= 10_000, "instance_balance_ms", self.instance_balance_ms, "0..10000")
        _check(self.dtype in DTYPES, "dtype", self.dtype, "|".join(DTYPES))
        _check(
            0 < self.kv_cache_memory_fraction <= 0.95,
            "kv_cache_memory_fraction",
            self.kv_cache_memory_fraction,
            "(0, 0.95]",
        )
        _check(
            self.kv_cache_tokens == 0 or self.kv_cache_tokens >= self.max_context,
            "kv_cache_tokens",
            self.kv_cache_tokens,
            f"0 (sized by memory) or >= max_context ({self.max_context}): one sequence at max_context must fit",
        )

        _check(self.kv_cache_dtype in KV_CACHE_DTYPES, "kv_cache_dtype", self.kv_cache_dtype, "|".join(KV_CACHE_DTYPES))
        _check(
            self.kv_cache_dtype == "auto" or self.runtime == "torch-cuda",
            "kv_cache_dtype",
            self.kv_cache_dtype,
            f"auto for runtime {self.runtime!r}: an fp8 KV cache is built for --runtime torch-cuda (its attention "
            "kernels read fp8 keys/values)",
        )
        _check(self.kv_policy in KV_POLICIES, "kv_policy", self.kv_policy, "|".join(KV_POLICIES))
        _check(self.quantization in QUANTIZATIONS, "quantization", self.quantization, "|".join(QUANTIZATIONS))
        allowed = RUNTIME_QUANTIZATIONS[self.runtime]
        if self.quantization not in allowed:
            raise ValueError(
                f"config quantization={self.quantization!r} is not built for runtime {self.runtime!r} "
                f"(it takes {'|'.join(allowed)}): {QUANTIZATION_ADVICE[self.quantization]}"
            )
        _check(
            not self.quantize_lm_head or (self.runtime == "torch-cuda" and self.quantization in ("fp8", "int8-wo")),
            "quantize_lm_head",
            self.quantize_lm_head,
            f"False with runtime={self.runtime!r} quantization={self.quantization!r}: the LM head is quantized "
            "by --runtime torch-cuda with --quantization fp8 or int8-wo (onnxruntime's int8 / int4 already include it)",
        )

    @property
    def separate_process(self) -> bool:
        """Whether Triton's model instance runs the engine loop in a child process (`engine_process`)."""
        return self.engine_process == "on" or (self.engine_process == "auto" and self.runtime != "onnxruntime")

    @property
    def ort_spins_after_run(self) -> bool:
        """Whether ONNX Runtime's threads go on spinning after each Run (`ort_spin_after_run`, resolved)."""
        if self.ort_spin_after_run == "auto":
            return self.quantization not in INTEGER_SCHEMES
        return self.ort_spin_after_run == "on"

    @property
    def io_instances(self) -> int:
        """Model instances per engine serving its requests and responses (`io_processes`, resolved)."""
        if self.io_processes:
            return self.io_processes
        return AUTO_IO_PROCESSES if self.separate_process else 1

    def to_parameters(self) -> dict[str, str]:
        return {f.name: str(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_parameters(cls, params: dict[str, str]) -> EngineConfig:
        kw: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in params:
                raw = params[f.name]
                kind = {"str": str, "float": float, "bool": lambda v: v == "True", "int": int}[f.type]
                kw[f.name] = kind(raw)
        return cls(**kw)


@dataclass
class SamplingParams:
    """One request's generation inputs, validated against an EngineConfig."""

    max_tokens: int = 64
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 0.0  # 0: not set; 1: the whole distribution. TensorRT-LLM's rule: top_k and top_p both
    # 0 means greedy whatever the temperature (a client that sends nothing, or only a temperature, gets greedy ids)
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0  # OpenAI's rule, over the generated tokens
    presence_penalty: float = 0.0
    seed: int | None = None
    end_id: int | None = None  # None: the model's EOS ids
    pad_id: int | None = None
    ignore_eos: bool = False
    stream: bool = False
    stop_ids: list[list[int]] = field(default_factory=list)
    bad_ids: list[list[int]] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)
    logprobs: bool = False  # return each generated token's log-probability (return_log_probs)
    top_logprobs: int = 0  # ... and the k most likely tokens at each step

    @property
    def has_output_penalties(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1 or (self.top_k == 0 and self.top_p == 0.0)

    def validate(self, cfg: EngineConfig, prompt_len: int, vocab_size: int) -> SamplingParams:
        def bad(name, value, fix):
            raise RequestValidationError(name, value, fix)

        if not 1 <= self.max_tokens <= cfg.max_tokens_limit:
            bad("max_tokens", self.max_tokens, f"use 1..{cfg.max_tokens_limit}")
        if prompt_len < 1:
            bad("text_input", "", "send a non-empty prompt")
        if prompt_len + self.max_tokens > cfg.max_context:
            room = cfg.max_context - prompt_len
            fix = (
                f"the prompt has {prompt_len} tokens and max_tokens is {self.max_tokens}; the context holds "
                f"{cfg.max_context}: " + (f"lower max_tokens to <= {room}" if room > 0 else "shorten the prompt")
            )
            bad("max_tokens" if room > 0 else "text_input", self.max_tokens if room > 0 else prompt_len, fix)
        if not 0 <= self.min_tokens <= self.max_tokens:
            bad("min_tokens", self.min_tokens, f"use 0..max_tokens ({self.max_tokens})")
        if not (0.0 <= self.temperature <= 100.0) or self.temperature != self.temperature:
            bad("temperature", self.temperature, "use 0 (greedy) or a value in (0, 100]")
        if not 0 <= self.top_k <= vocab_size:
            bad("top_k", self.top_k, f"use 0 (off) or 1..{vocab_size}")
        if not 0.0 <= self.top_p <= 1.0:
            bad("top_p", self.top_p, "use 0 (off) or a value in (0, 1]")
        if not 0.0 < self.repetition_penalty <= 10.0:
            bad("repetition_penalty", self.repetition_penalty, "use a value in (0, 10]; 1 is off")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                bad(name, getattr(self, name), "use a value in [-2, 2]; 0 is off")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            bad("seed", self.seed, "use an unsigned 64-bit integer")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            bad("top_logprobs", self.top_logprobs, f"use 0..{MAX_TOP_LOGPROBS}")
        if self.top_logprobs and not self.logprobs:
            bad("top_logprobs", self.top_logprobs, "use it with return_log_probs=true, or send 0")
        for name in ("end_id", "pad_id"):
            v = getattr(self, name)
            if v is not None and not 0 <= v < vocab_size:
                bad(name, v, f"use a token id in 0..{vocab_size - 1}")
        return self


def dumps(obj) -> str:
    return json.dumps(asdict(obj), sort_keys=True)
