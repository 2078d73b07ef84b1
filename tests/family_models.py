"""The tiny random checkpoint of each model family the tests serve: transformers' own config class,
the features each family is known for switched on where a tiny config can show them (windows
shorter than the prompts, caps the logits pass), and the family's chat turn format."""

from __future__ import annotations

from pathlib import Path

from tritonllm.model.prep import ChatFormat, prepare_tiny

BUILD = Path(__file__).resolve().parents[1] / "build"
CHAT_DIR = Path(__file__).resolve().parent / "fixtures" / "chat"
WINDOW = 5  # shorter than every test prompt plus its new tokens
LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "short_factor": [1.0, 1.3, 1.7, 2.0, 3.0, 4.0],  # 6 = 16 * 0.75 / 2
    "long_factor": [8.0] * 6,
    "original_max_position_embeddings": 512,
    "partial_rotary_factor": 0.75,
}
GEMMA3_ROPE = {  # Gemma 3's own: local layers plain, global layers linear-scaled on a larger base
    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
}
ALTERNATING = {"sliding_window": WINDOW, "layer_types": ["sliding_attention", "full_attention"]}


def _chat(template: str, tokens: tuple[str, ...], end: str) -> ChatFormat:
    return ChatFormat((CHAT_DIR / f"{template}.jinja").read_text(), tokens, end)


CHATML = _chat("chatml", ("<|im_start|>", "<|im_end|>"), "<|im_end|>")
GEMMA_CHAT = _chat("gemma", ("<start_of_turn>", "<end_of_turn>"), "<end_of_turn>")
PHI3_CHAT = _chat("phi3", ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), "<|end|>")
MISTRAL_CHAT = _chat("mistral", ("[INST]", "[/INST]"), "[/INST]")
FAMILIES = {  # the tiny checkpoint's name -> (model_type, chat format, config fields)
    "qwen2": ("qwen2", CHATML, {}),  # QKV biases
    "qwen2-windowed": (
        "qwen2",
        CHATML,
        {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
    ),
    "qwen3": ("qwen3", CHATML, {}),  # q/k RMSNorm per head
    "mistral": ("mistral", MISTRAL_CHAT, {"sliding_window": WINDOW}),
    "phi3": ("phi3", PHI3_CHAT, {"rope_parameters": LONGROPE, "original_max_position_embeddings": 512}),
    "gemma": ("gemma", GEMMA_CHAT, {"tie_word_embeddings": True}),
    "gemma2": (
        "gemma2",
        GEMMA_CHAT,
        {
            **ALTERNATING,
            "tie_word_embeddings": True,
            "query_pre_attn_scalar": 1,  # scale 1: the scores pass the small cap below
            "attn_logit_softcapping": 0.05,
            "final_logit_softcapping": 0.5,
        },
    ),
    "gemma3": (
        "gemma3_text",
        GEMMA_CHAT,
        {**ALTERNATING, "rope_parameters": GEMMA3_ROPE, "query_pre_attn_scalar": 8},
    ),
}


def family_checkpoint(name: str, smollm2_dir: Path) -> Path:
    kind, chat, extra = FAMILIES[name]
    return prepare_tiny(BUILD / "models" / f"tiny-{name}", smollm2_dir, family=kind, chat=chat, **extra)
