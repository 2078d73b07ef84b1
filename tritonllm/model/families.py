"""The model families the one decoder definition (`modeling.py`) serves, as data: which HF
`model_type`s, which of their features it reproduces, and the checks that refuse a checkpoint whose
features it would get wrong (never a silently wrong model). The decoder reads `Features` to build
its layers, and the torch runtime's fused kernels read the same fields."""

from __future__ import annotations

from dataclasses import dataclass

# model_type -> the family's name in messages; features beyond Llama's are read from the config
FAMILIES = {
    "llama": "Llama 2/3.x (and SmolLM2)",
    "smollm3": "SmolLM3",
    "mistral": "Mistral (sliding window)",
    "qwen2": "Qwen2 / Qwen2.5 (QKV biases)",
    "qwen3": "Qwen3 (q/k RMSNorm per head)",
    "phi3": "Phi-3 / Phi-4 (fused qkv and gate_up weights, partial rotary, longrope)",
    "gemma": "Gemma (GeGLU, (1 + w) RMSNorm, embedding scaling)",
    "gemma2": "Gemma 2 (as Gemma, plus sandwich norms, soft-capping, local/global attention)",
    "gemma3_text": "Gemma 3 text (as Gemma 2, plus q/k norm and a rotary per attention type)",
}
NOT_YET = {  # families users ask for whose features the decoder lacks
    "gemma3": "the vision tower (its text decoder alone is model_type gemma3_text)",
    "mixtral": "a mixture-of-experts MLP",
    "qwen2_moe": "a mixture-of-experts MLP",
    "qwen3_moe": "a mixture-of-experts MLP",
    "phimoe": "a mixture-of-experts MLP",
}
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
# rope types whose frequencies do not depend on the sequence length: HF's table is reproduced exactly
STATIC_ROPE = {"default", "linear", "llama3", "yarn", "longrope"}
FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass(frozen=True)
class Features:
    """What a checkpoint needs beyond a plain Llama decoder; per-layer tuples have one entry a layer."""

    layer_types: tuple[str, ...]  # FULL or SLIDING attention, each layer
    sliding_window: int | None = None  # a SLIDING layer attends to the last W positions only
    rope_per_layer_type: bool = False  # one rotary table per layer type (Gemma 3's local/global)
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2)
    qk_norm: bool = False  # RMSNorm over each head of q and k before the rotary embedding (Qwen3, Gemma 3)
    norm_offset: float = 0.0  # RMSNorm scales by (offset + w), in fp32 before the cast (Gemma: 1)
    sandwich_norms: bool = False  # norms on the attention and MLP outputs too (Gemma 2/3)
    activation: str = "silu"  # of the gated MLP: silu, gelu_tanh (GeGLU), gelu
    embed_scale: float | None = None  # embeddings times sqrt(hidden) (Gemma)
    attn_scale: float | None = None  # query scaling instead of head_dim ** -0.5 (Gemma's query_pre_attn_scalar)
    attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    logit_softcap: float | None = None  # final logits -> cap * tanh(logits / cap) (Gemma 2)

    def window(self, layer: int) -> int | None:
        return self.sliding_window if self.layer_types[layer] == SLIDING else None


def _rope_parameters(config) -> list[dict]:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if FULL in params or SLIDING in params:  # one set per layer type
        return [p or {} for p in params.values()]
    return [params]


def _layer_types(config) -> tuple[str, ...]:
    n = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    if types:
        return tuple(types)
    windowed = getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
    return (SLIDING if windowed else FULL,) * n


def _refuse(kind: str) -> None:
    missing = f" (needs {NOT_YET[kind]}, not implemented)" if kind in NOT_YET else ""
    raise ValueError(
        f"model_type {kind!r}{missing} is not supported; supported: "
        + ", ".join(f"{k} = {v}" for k, v in FAMILIES.items())
    )


def _checked_activation(config) -> str:
    # Gemma 2/3 read hidden_activation; every other family (Gemma 1 included) hidden_act
    gemma23 = config.model_type in ("gemma2", "gemma3_text")
    name = config.hidden_activation if gemma23 else getattr(config, "hidden_act", "silu")
    if name not in ACTIVATIONS:
        raise ValueError(
            f"{config.model_type}: MLP activation {name!r} is not implemented; supported: {sorted(ACTIVATIONS)}"
        )
    return ACTIVATIONS[name]


def _check_rope(config) -> None:
    for params in _rope_parameters(config):
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in STATIC_ROPE:
            raise ValueError(
                f"{config.model_type}: rope_type {kind!r} changes its frequencies with the sequence length, "
                f"which the engine's cache does not reproduce; supported rope types: {sorted(STATIC_ROPE)}"
            )


def features(config) -> Features:
    """The features of an HF config, or ValueError naming what is not supported and what is."""
    kind = config.model_type
    if kind not in FAMILIES:
        _refuse(kind)
    _check_rope(config)
    gemma = kind.startswith("gemma")
    types = _layer_types(config)
    scalar = getattr(config, "query_pre_attn_scalar", None)
    rope = getattr(config, "rope_parameters", None) or {}
    return Features(
        layer_types=types,
        sliding_window=getattr(config, "sliding_window", None) if SLIDING in types else None,
        rope_per_layer_type=FULL in rope or SLIDING in rope,
        qkv_bias=bool(getattr(config, "attention_bias", False)) or kind == "qwen2",
        qk_norm=kind in ("qwen3", "gemma3_text"),
        norm_offset=1.0 if gemma else 0.0,
        sandwich_norms=kind in ("gemma2", "gemma3_text"),
        activation=_checked_activation(config),
        embed_scale=config.hidden_size**0.5 if gemma else None,
        attn_scale=scalar**-0.5 if gemma and scalar else None,
        attn_softcap=getattr(config, "attn_logit_softcapping", None),
        logit_softcap=getattr(config, "final_logit_softcapping", None),
    )


def check_context(config, max_context: int) -> None:
    """Longrope (Phi-3/Phi-4) switches every position to its long factors once a sequence passes
    original_max_position_embeddings, re-rotating what is already cached: the engine reproduces
    HF exactly only while the whole context stays within the original length."""
    features(config)
    for params in _rope_parameters(config):
        original = params.get("original_max_position_embeddings") or getattr(
            config, "original_max_position_embeddings", None
        )
        if params.get("rope_type") == "longrope" and original and max_context > original:
            raise ValueError(
                f"{config.model_type} uses longrope, whose frequencies change past {original} tokens (its "
                f"original_max_position_embeddings) and the engine's max_context is {max_context}: build with "
                f"--max-context <= {original} (exact there)"
            )
