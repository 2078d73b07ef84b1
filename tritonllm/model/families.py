"""The model families the one decoder definition (`modeling.py`) serves, as data: which HF
`model_type`s, which of their features it reproduces, and the checks that refuse a checkpoint whose
features it would get wrong (never a silently wrong model). The torch runtime reads the same `Features`
(a q/k norm turns its fused decode kernels off)."""

from __future__ import annotations

from dataclasses import dataclass

# model_type -> the family's name in messages; features beyond Llama's are read from the config
FAMILIES = {
    "llama": "Llama (and SmolLM2)",
    "smollm3": "SmolLM3",
    "mistral": "Mistral",
    "qwen2": "Qwen2 / Qwen2.5 (QKV biases)",
    "qwen3": "Qwen3 (q/k RMSNorm per head)",
}
NOT_YET = {  # families users ask for whose features the decoder lacks
    "gemma2": "GeGLU, (1 + w) RMSNorm, embedding scaling, soft-capping, local/global attention",
    "gemma3_text": "GeGLU, (1 + w) RMSNorm, embedding scaling, local/global attention",
    "phi3": "fused qkv / gate_up weights and its rope scaling",
}


@dataclass(frozen=True)
class Features:
    """What a checkpoint needs beyond a plain Llama decoder."""

    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2)
    qk_norm: bool = False  # RMSNorm over each head of q and k before the rotary embedding (Qwen3)
    sliding_window: int | None = None  # attention to the last W positions only (some Mistral / Qwen configs)


def features(config) -> Features:
    """The features of an HF config, or ValueError naming what is not supported and what is."""
    kind = config.model_type
    if kind not in FAMILIES:
        missing = f" (needs {NOT_YET[kind]}, not implemented)" if kind in NOT_YET else ""
        raise ValueError(
            f"model_type {kind!r}{missing} is not supported; supported: "
            + ", ".join(f"{k} = {v}" for k, v in FAMILIES.items())
        )
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    return Features(
        qkv_bias=bool(getattr(config, "attention_bias", False)) or kind == "qwen2",
        qk_norm=kind == "qwen3",
        sliding_window=window,
    )


def check_context(config, max_context: int) -> None:
    """A sliding window shorter than the engine's context would need windowed attention, which the
    runtimes do not have: within the window the model is exact, so the context must fit in it."""
    window = features(config).sliding_window
    if window is not None and window < max_context:
        raise ValueError(
            f"{config.model_type} attends to a sliding window of {window} tokens and the engine's max_context is "
            f"{max_context}: windowed attention is not implemented; build with --max-context <= {window} "
            "(exact there)"
        )
