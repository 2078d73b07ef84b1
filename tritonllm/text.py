"""Tokenizer-side logic for the tokenizer and detokenizer stages (Triton-free).

Streaming detokenization is stateless: each engine response carries its new ids plus a few ids
already sent (`n_context`). The text a prefix of ids may show is a pure function of those ids
(`visible_text`): incomplete UTF-8 at the end and any tail that could still become a stop string
are held back, and everything from the first stop string on is cut. A response's delta is the
visible text of all its ids minus that of its context ids, so the deltas concatenate exactly to
the non-streamed text, with no lost spaces and no split characters."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import RequestValidationError

REPLACEMENT = "\ufffd"


class TokenizerFiles:
    """tokenizer.json (+ chat template) loaded with `tokenizers` and jinja2: no transformers needed."""

    def __init__(self, directory: Path):
        from tokenizers import Tokenizer

        directory = Path(directory)
        self.tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        self.chat_template = None
        cfg_path = directory / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        tpl = directory / "chat_template.jinja"
        self.chat_template = tpl.read_text() if tpl.exists() else cfg.get("chat_template")
        self.bos_token = cfg.get("bos_token") if isinstance(cfg.get("bos_token"), str) else None
        self.eos_token = cfg.get("eos_token") if isinstance(cfg.get("eos_token"), str) else None
        self._template = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # The batch-fast path skips the character offsets, which nothing here reads: less work a
        # prompt for the same ids (tests/unit/test_text.py; timings in docs/decisions.md).
        return self.tokenizer.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def decode_one(self, token_id: int) -> str:
        """One token's own text, special tokens included (a piece of a multi-byte character reads
        as U+FFFD, as in other OpenAI-compatible servers)."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def render_chat(self, messages: list[dict]) -> str:
        if not self.chat_template:
            raise RequestValidationError(
                "apply_chat_template",
                True,
                "this model has no chat template: send plain text with apply_chat_template=false",
            )
        if self._template is None:
            self._template = template_environment().from_string(self.chat_template)
        return self._template.render(
            messages=messages,
            add_generation_prompt=True,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )


def template_environment():
    """Jinja as chat templates expect it (the helpers transformers gives them): `raise_exception`
    (a template refusing a conversation: that request's error), `strftime_now` (Llama 3.x dates),
    loop controls, and `tojson` that keeps non-ASCII text as it is."""
    from datetime import datetime

    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise RequestValidationError("text_input", "messages", str(msg))

    def tojson(value, indent=None, ensure_ascii=False, separators=None, sort_keys=False):
        return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = tojson
    return env


def parse_messages(text: str) -> list[dict]:
    """A JSON list of {role, content} messages, or plain text taken as one user message."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            msgs = json.loads(stripped)
        except json.JSONDecodeError:
            msgs = None
        if isinstance(msgs, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
            return msgs
    return [{"role": "user", "content": text}]


def encode_prompt(tok: TokenizerFiles, text: str, apply_chat_template: bool, max_context: int) -> list[int]:
    if not text or not text.strip():
        raise RequestValidationError("text_input", text, "send a non-empty prompt")
    if apply_chat_template:
        ids = tok.encode(tok.render_chat(parse_messages(text)), add_special_tokens=False)
    else:
        ids = tok.encode(text)
    if len(ids) >= max_context:
        raise RequestValidationError(
            "text_input",
            f"<{len(ids)} tokens>",
            f"the prompt must be shorter than the context of {max_context} tokens; shorten it",
        )
    return ids


def encode_words(tok: TokenizerFiles, words: list[str], field: str) -> list[list[int]]:
    """Token id sequences for stop/bad words: the word as written and with a leading space, since
    a word inside text usually tokenizes with the space before it."""
    out: list[list[int]] = []
    for w in words:
        if not w:
            raise RequestValidationError(field, w, "remove empty strings from the list")
        for variant in (w, " " + w) if not w[0].isspace() else (w,):
            ids = tok.encode(variant, add_special_tokens=False)
            if ids and ids not in out:
                out.append(ids)
    return out


def flatten_id_lists(lists: list[list[int]]) -> list[int]:
    """[[1,2],[3]] -> [1,2,-1,3]: id lists as one INT32 tensor, -1 separated."""
    flat: list[int] = []
    for ids in lists:
        if flat:
            flat.append(-1)
        flat.extend(ids)
    return flat


def split_id_lists(flat: list[int]) -> list[list[int]]:
    out, cur = [], []
    for i in flat:
        if i == -1:
            if cur:
                out.append(cur)
            cur = []
        else:
            cur.append(int(i))
    if cur:
        out.append(cur)
    return out


def _held_back_tail(text: str, stops: list[str]) -> int:
    """Length of the longest tail of text that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def visible_text(text: str, final: bool, stops: list[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    if cut >= 0:
        return text[:cut]
    if final:
        return text
    text = text.rstrip(REPLACEMENT)
    return text[: len(text) - _held_back_tail(text, stops)]


def text_delta(tok: TokenizerFiles, ids: list[int], n_context: int, final: bool, stops: list[str]) -> str:
    """The new text one response adds, given its ids of which the first n_context were sent before."""
    cur = visible_text(tok.decode(ids), final, stops)
    if n_context == 0:
        return cur
    prev = visible_text(tok.decode(ids[:n_context]), False, stops)
    if cur.startswith(prev):
        return cur[len(prev) :]
    common = 0
    while common < min(len(cur), len(prev)) and cur[common] == prev[common]:
        common += 1
    return cur[common:]
