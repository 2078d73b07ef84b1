"""Incremental detokenization on tricky text with the real SmolLM2 tokenizer (byte-level BPE):
streamed deltas, computed statelessly from the engine's response windows, concatenate exactly to
the non-streamed text, never show a replacement character, never show part of a stop string."""

import pytest

from tritonllm.config import SamplingParams
from tritonllm.engine.loop import response_window
from tritonllm.engine.sampling import new_rng
from tritonllm.engine.sequence import Sequence
from tritonllm.text import (
    TokenizerFiles,
    encode_words,
    flatten_id_lists,
    parse_messages,
    split_id_lists,
    text_delta,
    visible_text,
)

TRICKY = [
    "Hello world, how are you?",
    "  leading spaces and   inner   runs\n\nnew paragraphs\t tabs",
    "emoji 😀🎉👩‍👩‍👧 family and flags 🇫🇷🇯🇵",
    "日本語のテキストと中文文本，还有한국어",
    "combining: e\u0301 a\u0308 and ligature ﬁ, math ∑∫√ and arrows → ⇒",
    "mixed😀日本語 words😀😀 glued",
    "ends with emoji 🐍",
]


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return TokenizerFiles(smollm2_dir)


def stream_deltas(tok, ids, stops=(), chunk=1):
    """Simulate the engine's response windows, `chunk` new ids per response."""
    seq = Sequence([1], SamplingParams(stream=True, stop_strings=list(stops)), frozenset(), new_rng(0))
    seq.params.stop_ids = [tok.encode(s, add_special_tokens=False) for s in stops]
    deltas = []
    for i in range(0, len(ids), chunk):
        seq.output_ids = ids[: i + chunk]
        final = i + chunk >= len(ids)
        window, n_ctx = response_window(seq, final)
        deltas.append(text_delta(tok, window, n_ctx, final, list(stops)))
        seq.emitted = len(seq.output_ids)
    return deltas


@pytest.mark.parametrize("text", TRICKY)
@pytest.mark.parametrize("chunk", [1, 3])
def test_stream_concat_equals_full_decode(tok, text, chunk):
    ids = tok.encode(text, add_special_tokens=False)
    deltas = stream_deltas(tok, ids, chunk=chunk)
    assert "".join(deltas) == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


def test_multibyte_characters_are_split_across_tokens(tok):
    """The premise of the test above: some ids decode to partial UTF-8 on their own."""
    ids = tok.encode("😀🎉", add_special_tokens=False)
    assert len(ids) > 2 and any("\ufffd" in tok.decode([i]) for i in ids)


def test_spaces_survive_token_by_token(tok):
    ids = tok.encode("a b  c   d", add_special_tokens=False)
    assert "".join(stream_deltas(tok, ids)) == "a b  c   d"


def test_stop_string_is_cut_and_never_partially_streamed(tok):
    text = "The answer is 42.\nUser: next question"
    ids = tok.encode(text, add_special_tokens=False)
    deltas = stream_deltas(tok, ids, stops=["\nUser:"])
    assert "".join(deltas) == "The answer is 42."
    assert all("\n" not in d for d in deltas)


def test_visible_text_holds_back_stop_prefix_and_incomplete_char():
    assert visible_text("abc\nUs", False, ["\nUser:"]) == "abc"
    assert visible_text("abc\nUs", True, ["\nUser:"]) == "abc\nUs"
    assert visible_text("ab\ufffd", False, []) == "ab"
    assert visible_text("ab\ufffd", True, []) == "ab\ufffd"
    assert visible_text("x STOP y", False, ["STOP"]) == "x "


def test_stop_words_encode_with_and_without_leading_space(tok):
    ids = encode_words(tok, ["world"], "stop_words")
    assert ids[0] == tok.encode("world", add_special_tokens=False)
    assert ids[1] == tok.encode(" world", add_special_tokens=False)
    assert split_id_lists(flatten_id_lists(ids)) == ids


def test_chat_template_renders_messages(tok):
    prompt = tok.render_chat(parse_messages("What is 2+2?"))
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>" in prompt and prompt.endswith("<|im_start|>assistant\n")
    msgs = parse_messages('[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]')
    assert [m["role"] for m in msgs] == ["system", "user"]


@pytest.mark.parametrize("special", [True, False])
def test_encode_matches_the_tokenizers_own_encode(tok, special):
    texts = ["", "Hello world", "  lead\n\ttabs", "é 🤖🎉 中文", "<|im_start|>user\nhi<|im_end|>", "ab" * 2000]
    for text in texts:
        assert tok.encode(text, special) == tok.tokenizer.encode(text, add_special_tokens=special).ids
