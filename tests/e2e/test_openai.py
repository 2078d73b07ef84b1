"""The OpenAI-compatible API against the real server, driven by the official `openai` SDK and raw
HTTP: chat and completions, streamed and not, stop strings, seeds, usage, errors in OpenAI's form
with the right status, and a client that walks away cancelling its engine request."""

import time

import httpx
import openai
import pytest

from tritonllm.openai.server import Gateway
from tritonllm.triton.server_process import free_port

from .helpers import wait_for_metric


@pytest.fixture(scope="module")
def gateway(server, model_repository):
    gw = Gateway(server.grpc_url, model_repository, port=free_port()).start()
    yield gw.url
    gw.stop()


@pytest.fixture
def client(gateway):
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_and_health(client, gateway):
    assert sorted(m.id for m in client.models.list()) == ["smollm2", "tiny", "tiny_onehop"]
    assert httpx.get(f"{gateway}/health").status_code == 200


def test_chat_streamed_equals_not_streamed_with_usage(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Say something"}], max_tokens=24, temperature=0)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and whole.choices[0].finish_reason == "length"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24 == whole.usage.completion_tokens
    assert whole.usage.prompt_tokens > 0 and whole.object == "chat.completion"


def test_usage_reports_the_prompt_tokens_the_prefix_cache_held(client):
    """OpenAI's usage.prompt_tokens_details.cached_tokens: the first time at most the chat template's
    opening that other chats share, the second time every whole block but the one with the last token."""
    content = "Repeat after me, slowly and carefully, every word of this long request. " * 4
    kw = dict(model="tiny", messages=[{"role": "user", "content": content}], max_tokens=4, temperature=0)
    first, second = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    cached = [r.usage.prompt_tokens_details.cached_tokens for r in (first, second)]
    assert cached[0] < cached[1] == (second.usage.prompt_tokens - 1) // 16 * 16


def test_smollm2_answers_a_chat_question(client):
    r = client.chat.completions.create(
        model="smollm2",
        max_tokens=24,
        temperature=0,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    )
    assert "Paris" in r.choices[0].message.content


def test_completions_seed_and_stop(client):
    kw = dict(model="tiny", prompt="Once upon a time", max_tokens=20, temperature=1.0, seed=7)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text and a.object == "text_completion"
    greedy = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=20, temperature=0)
    assert a.choices[0].text != greedy.choices[0].text  # OpenAI's defaults (top_p 1) sample
    text = greedy.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    stopped = client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=20, temperature=0, stop=[stop]
    )
    assert stop not in stopped.choices[0].text and text.startswith(stopped.choices[0].text)
    assert stopped.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    "body,param",
    [
        (dict(messages=[]), "messages"),
        (dict(messages=[{"role": "wizard", "content": "hi"}]), "messages"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=100000), "max_tokens"),
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(n=2), "n"),
        (dict(top_logprobs=21, logprobs=True), "top_logprobs"),
        (dict(top_logprobs=2), "body"),  # top_logprobs without logprobs: a whole-body rule
        (dict(messages=[{"role": "user", "content": "word " * 400}]), "messages"),
    ],
)
def test_bad_chat_input_is_a_400_naming_the_field(client, body, param):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4) | body
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**kw)
    assert e.value.status_code == 400 and e.value.body["param"] == param, e.value.body
    assert client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "ok?"}], max_tokens=2)


def test_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    assert "tiny" in e.value.body["message"] and e.value.body["code"] == "model_not_found"


@pytest.mark.parametrize(
    "content,headers,status",
    [
        (b"{not json", {"content-type": "application/json"}, 400),
        (b"model=tiny", {"content-type": "application/x-www-form-urlencoded"}, 400),
        (b'{"model": "tiny", "prompt": "' + b"a" * (5 << 20) + b'"}', {"content-type": "application/json"}, 413),
    ],
)
def test_malformed_bodies_are_4xx_and_the_server_keeps_serving(gateway, client, content, headers, status):
    r = httpx.post(f"{gateway}/v1/completions", content=content, headers=headers, timeout=30)
    assert r.status_code == status and r.json()["error"]["message"], r.text
    assert client.completions.create(model="tiny", prompt="still there", max_tokens=2).choices[0].text is not None


def test_a_client_that_walks_away_cancels_its_engine_request(gateway, server):
    """Streaming chat, the client closes the connection after the first chunk: the engine's request
    ends as cancelled (the gateway addresses the engine, whose cancellation Triton delivers), long
    before its 200 tokens. SmolLM2 (tens of ms a token here): the tiny model can write all its tokens
    before a loaded 2-core machine has passed the disconnect on."""
    cancelled_before = sum_reason(server, "cancelled")
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "walk away"}],
        "max_tokens": 200,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream("POST", f"{gateway}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        next(r.iter_lines())
    wait_for_metric(server, "tritonllm_requests_active", "smollm2_engine", lambda v: v == 0, timeout_s=30)
    deadline = time.monotonic() + 10  # a finished request's count can show a moment after its slot is free
    while sum_reason(server, "cancelled") == cancelled_before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sum_reason(server, "cancelled") == cancelled_before + 1


def sum_reason(server, reason: str) -> float:
    from tritonllm.triton.scrape import metric_samples

    return sum(
        v
        for n, labels, v in metric_samples(server.metrics())
        if n == "tritonllm_requests_finished_total"
        and labels.get("model") == "smollm2_engine"
        and labels.get("reason") == reason
    )


def test_penalties_reach_the_sampler(client):
    """SmolLM2 continues a run of "hello" with more of them greedily; a frequency and presence
    penalty (over its own output) cut that short, deterministically."""
    kw = dict(model="smollm2", prompt=" ".join(["hello"] * 8), max_tokens=16, temperature=0)
    plain = client.completions.create(**kw).choices[0].text
    penalised = [
        client.completions.create(**kw, frequency_penalty=2.0, presence_penalty=1.0).choices[0].text for _ in range(2)
    ]
    assert plain.count("hello") >= 3, plain
    assert penalised[0] == penalised[1] and penalised[0].count("hello") < plain.count("hello"), (plain, penalised)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**kw, frequency_penalty=3.0)
    assert e.value.body["param"] == "frequency_penalty"


def test_logprobs_chat_and_completions_streamed_and_not(client, tiny_dir, tiny_engine_dir):
    """The SDK reads chat's `logprobs.content` and the completions' columns; the numbers are the
    engine's (in-process, same greedy request) and the tokens spell the text."""
    from tritonllm.config import EngineConfig
    from tritonllm.engine.inprocess import InProcessEngine
    from tritonllm.text import TokenizerFiles

    kw = dict(model="tiny", prompt="Log-probabilities via OpenAI", max_tokens=8, temperature=0)
    whole = client.completions.create(**kw, logprobs=2)
    lp = whole.choices[0].logprobs
    with InProcessEngine(tiny_engine_dir, EngineConfig(max_slots=1, max_context=256, max_tokens_limit=64)) as eng:
        ref = eng.generate(TokenizerFiles(tiny_dir).encode(kw["prompt"]), max_tokens=8, temperature=0.0)
    assert "".join(lp.tokens) == whole.choices[0].text and len(lp.token_logprobs) == len(ref.ids)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert all(len(t) <= 2 and max(t.values()) == pytest.approx(v) for t, v in zip(lp.top_logprobs, lp.token_logprobs))
    chat = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0)
    c = client.chat.completions.create(**chat, logprobs=True, top_logprobs=3)
    content = c.choices[0].logprobs.content
    assert "".join(t.token for t in content) == c.choices[0].message.content and len(content) == 8
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob == pytest.approx(t.logprob) for t in content)
    streamed = [
        t
        for ch in client.chat.completions.create(**chat, logprobs=True, stream=True)
        if ch.choices
        for t in (ch.choices[0].logprobs.content if ch.choices[0].logprobs else [])
    ]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content], abs=1e-6)
    assert client.chat.completions.create(**chat).choices[0].logprobs is None
