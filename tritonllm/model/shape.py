"""Architecture facts every runtime and the engine need, written beside each engine as
model_shape.json. Torch-free, so a repository served by ONNX Runtime needs no torch."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    pad_token_id: int | None

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> ModelShape:
        d = json.loads(Path(path).read_text())
        d["eos_token_ids"] = tuple(d["eos_token_ids"])
        return cls(**d)


def shape_of(hf_model) -> ModelShape:
    """The shape of a loaded HF causal LM (EOS ids from its generation config where it has one)."""
    c = hf_model.config
    eos = hf_model.generation_config.eos_token_id if hf_model.generation_config else c.eos_token_id
    eos = eos if eos is not None else c.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return ModelShape(
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_key_value_heads or c.num_attention_heads,
        head_dim,
        c.hidden_size,
        c.vocab_size,
        c.max_position_embeddings,
        eos_ids,
        c.bos_token_id,
        c.pad_token_id,
    )
