"""Prompt sources for load tests: synthetic prompts with token-accurate lengths (the model's own
tokenizer), or a JSONL file; deterministic for a seed."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

WORDS = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
    "quebec romeo sierra tango uniform victor whiskey xray yankee zulu"
).split()


@dataclass(frozen=True)
class Prompt:
    text: str
    max_tokens: int
    input_tokens: int | None = None


def _clip(rng: random.Random, mean: float, std: float, lo: int) -> int:
    return max(lo, int(round(rng.gauss(mean, std)))) if std > 0 else max(lo, int(mean))


def synthetic(
    n: int,
    input_mean: float,
    input_std: float,
    output_mean: float,
    output_std: float,
    tokenizer_dir: str | None = None,
    seed: int = 0,
) -> list[Prompt]:
    """Prompts of a drawn token length: words are added until the tokenizer counts the target, so
    the input length is exact for that model (approximate, one word = one token, without one)."""
    rng = random.Random(seed)
    tok = None
    if tokenizer_dir:
        from tritonllm.text import TokenizerFiles

        tok = TokenizerFiles(Path(tokenizer_dir))
    out = []
    for _ in range(n):
        target = _clip(rng, input_mean, input_std, 1)
        words = [rng.choice(WORDS) for _ in range(target)]
        if tok is not None:
            ids = tok.encode(" ".join(words), add_special_tokens=False)[:target]
            text = tok.decode(ids)
            count = len(tok.encode(text, add_special_tokens=False))
        else:
            text, count = " ".join(words), target
        out.append(Prompt(text, _clip(rng, output_mean, output_std, 1), count))
    return out


def from_jsonl(path: str, default_max_tokens: int = 64) -> list[Prompt]:
    """One JSON object a line: {"prompt": "...", "max_tokens": 64} (max_tokens optional)."""
    out = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        obj = json.loads(line)
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise ValueError(f"{path}:{i}: each line needs a JSON object with a string 'prompt'")
        out.append(Prompt(obj["prompt"], int(obj.get("max_tokens", default_max_tokens))))
    return out
