"""End-to-end against a real tritonserver (from the nvidia-pytriton wheel) over gRPC streaming."""

import asyncio
import queue
import time

import pytest
import torch
import tritonclient.grpc as grpcclient

from tritonllm.client import AsyncLLMClient, GenerationError, LLMClient
from tritonllm.model.modeling import load_hf
from tritonllm.text import TokenizerFiles

from .helpers import cancel_reaches_engine, engine_output_ids, metric_value, wait_for_metric


@pytest.fixture
def tiny(live_server):
    with LLMClient(live_server.grpc_url, "tiny", timeout_s=60) as c:
        yield c


def hf_greedy_text(ckpt, prompt, n):
    tok = TokenizerFiles(ckpt)
    hf = load_hf(ckpt)
    ids = tok.encode(prompt)
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids]),
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            pad_token_id=hf.config.eos_token_id,
        )[0, len(ids) :].tolist()
    return out, tok.decode(out)


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_greedy_through_ensemble_matches_hf_generate(live_server, which, request):
    ckpt = request.getfixturevalue(f"{which}_dir")
    prompt, n = "The history of the city begins", 20
    ids, text = hf_greedy_text(ckpt, prompt, n)
    with LLMClient(live_server.grpc_url, which, timeout_s=120) as c:
        r = c.generate(prompt, max_tokens=n, temperature=0.0, ignore_eos=True)
    served = engine_output_ids(live_server.grpc_url, f"{which}_engine", TokenizerFiles(ckpt).encode(prompt), n)
    assert served == ids
    assert r.num_output_tokens == n and r.num_input_tokens == len(TokenizerFiles(ckpt).encode(prompt))
    assert r.text == text
    assert r.finish_reason == "length"


def test_stream_deltas_concatenate_to_non_streamed_text(tiny):
    prompt = "Streaming text with émojis 😀 and 日本語:"
    full = tiny.generate(prompt, max_tokens=60, temperature=0.0, ignore_eos=True)
    chunks = list(tiny.stream(prompt, max_tokens=60, temperature=0.0, ignore_eos=True))
    assert len(chunks) > 10  # really streamed
    assert "".join(c.text for c in chunks) == full.text
    assert chunks[-1].final and chunks[-1].finish_reason == "length"
    assert not any("\ufffd" in c.text for c in chunks[:-1])


def test_engine_side_detokenization_gives_the_same_text_as_the_detokenizer_stage(live_server, tiny):
    """`emit_text`: tokenizer -> engine (one python hop fewer per response) answers exactly as the
    three-stage ensemble: UTF-8 across tokens, streamed deltas, stop words, counters. That engine
    also prefills the 19-token prompt in two pieces (16-token budget), and later in one after its
    cached first block: the same greedy and seeded text as the whole-prompt prefill."""
    with grpcclient.InferenceServerClient(live_server.grpc_url) as admin:
        served = {m["name"] for m in admin.get_model_repository_index(as_json=True)["models"]}
    assert "tiny_onehop_engine" in served and "tiny_onehop_detokenizer" not in served
    prompt = "Streaming text with émojis 😀 and 日本語:"
    kw = dict(max_tokens=60, temperature=0.0, ignore_eos=True)
    pieces, prefilled = (
        metric_value(live_server, f"tritonllm_{m}_total", "tiny_onehop_engine")
        for m in ("prefill_steps", "prefilled_sequences")
    )
    with LLMClient(live_server.grpc_url, "tiny_onehop", timeout_s=60) as onehop:
        ref, got = tiny.generate(prompt, **kw), onehop.generate(prompt, **kw)
        chunks = list(onehop.stream(prompt, **kw))
        stop = ref.text.split()[3]
        stopped = onehop.generate(prompt, stop_words=[stop], **kw)
        streamed_stop = "".join(c.text for c in onehop.stream(prompt, stop_words=[stop], **kw))
        seeded = [c.generate(prompt, max_tokens=30, temperature=1.0, top_p=1.0, seed=7).text for c in (tiny, onehop)]
        lps = [c.generate(prompt, max_tokens=6, return_log_probs=True, top_logprobs=2) for c in (tiny, onehop)]
    assert got.text == ref.text == "".join(c.text for c in chunks) and len(chunks) > 10
    assert (got.finish_reason, got.num_output_tokens, got.num_input_tokens) == (
        ref.finish_reason,
        ref.num_output_tokens,
        ref.num_input_tokens,
    )
    assert stopped.finish_reason == "stop" and stop not in stopped.text and streamed_stop == stopped.text
    assert seeded[0] == seeded[1]
    assert lps[0].logprobs == pytest.approx(lps[1].logprobs) and len(lps[1].top_logprobs) == 6
    after = wait_for_metric(
        live_server, "tritonllm_prefilled_sequences_total", "tiny_onehop_engine", lambda v: v >= prefilled + 5
    )  # the five requests above
    pieces = metric_value(live_server, "tritonllm_prefill_steps_total", "tiny_onehop_engine") - pieces
    # the first prompt goes in two pieces; the later ones find its first block in the prefix cache,
    # and the budget counts only the 3 tokens they compute: one step each
    assert pieces >= (after - prefilled) + 1, (pieces, after - prefilled)


def test_same_seed_same_text_and_different_seed_differs(tiny):
    kw = dict(max_tokens=30, temperature=1.0, top_p=0.95, top_k=50, ignore_eos=True)
    a = tiny.generate("Tell me a story", seed=1234, **kw).text
    b = tiny.generate("Tell me a story", seed=1234, **kw).text
    c = tiny.generate("Tell me a story", seed=99, **kw).text
    streamed = "".join(ch.text for ch in tiny.stream("Tell me a story", seed=1234, **kw))
    assert a == b == streamed
    assert a != c


def test_prompt_is_not_echoed_unless_asked(tiny):
    prompt = "Echo check prompt"
    r = tiny.generate(prompt, max_tokens=5, temperature=0.0, ignore_eos=True)
    echoed = tiny.generate(prompt, max_tokens=5, temperature=0.0, ignore_eos=True, exclude_input_in_output=False)
    assert not r.text.startswith(prompt)
    assert echoed.text == prompt + r.text


def test_stop_words_end_generation_and_are_trimmed(tiny):
    full = tiny.generate("Counting:", max_tokens=40, temperature=0.0, ignore_eos=True).text
    words = full.split()
    assert len(words) > 4
    stop = words[3]
    r = tiny.generate("Counting:", max_tokens=40, temperature=0.0, ignore_eos=True, stop_words=[stop])
    assert r.finish_reason == "stop" and stop not in r.text
    assert full.startswith(r.text) and len(r.text) < len(full)
    streamed = "".join(
        c.text for c in tiny.stream("Counting:", max_tokens=40, temperature=0.0, ignore_eos=True, stop_words=[stop])
    )
    assert streamed == r.text


def test_eight_concurrent_requests_share_decode_steps(live_server):
    """8 asyncio streams of different lengths through 4 slots all complete with the right text,
    and the engine's metrics show decode steps shared by several sequences."""
    lengths = [5, 40, 12, 60, 25, 8, 50, 33]
    prompts = [f"Request number {i} says" for i in range(8)]
    with LLMClient(live_server.grpc_url, "tiny") as c:
        expected = [
            c.generate(p, max_tokens=n, temperature=0.0, ignore_eos=True).text for p, n in zip(prompts, lengths)
        ]
    counters = (
        "tritonllm_batched_decode_steps_total",
        "tritonllm_prefilled_sequences_total",
        "tritonllm_prefill_steps_total",
        "tritonllm_loop_steps_total",
    )
    time.sleep(1.0)  # the engine publishes its counters every 0.5 s: let the warm-up's land first
    batched_before, prefilled_before, prefill_steps_before, steps_before = (
        metric_value(live_server, m, "tiny_engine") for m in counters
    )

    async def run():
        client = AsyncLLMClient(live_server.grpc_url, "tiny")
        try:
            return await asyncio.gather(
                *[
                    client.generate(p, max_tokens=n, temperature=0.0, ignore_eos=True, stream=True)
                    for p, n in zip(prompts, lengths)
                ]
            )
        finally:
            await client.close()

    results = asyncio.run(run())
    assert [r.text for r in results] == expected
    assert [r.num_output_tokens for r in results] == lengths
    wait_for_metric(
        live_server, "tritonllm_batched_decode_steps_total", "tiny_engine", lambda v: v >= batched_before + 20
    )
    prefilled = wait_for_metric(live_server, counters[1], "tiny_engine", lambda v: v >= prefilled_before + 8)
    assert prefilled == prefilled_before + 8
    prefill_steps = metric_value(live_server, counters[2], "tiny_engine") - prefill_steps_before
    assert 1 <= prefill_steps <= 8
    # every token of the longest request took a step
    wait_for_metric(live_server, counters[3], "tiny_engine", lambda v: v >= steps_before + max(lengths))
    assert metric_value(live_server, "tritonllm_loop_seconds_total", "tiny_engine") > 0  # first phase listed


def test_a_repeated_prompt_prefix_comes_from_the_prefix_cache(live_server, tiny):
    """The second of two requests with the same 3-block prompt reuses its cached blocks: the same
    text, and the prefix-cache counters on /metrics count the reused tokens."""
    prompt = "A long shared system prompt that many requests begin with, word after word. " * 4
    queried, hits = "tritonllm_prefix_cache_queried_tokens_total", "tritonllm_prefix_cache_hit_tokens_total"
    hits_before = metric_value(live_server, hits, "tiny_engine")
    first = tiny.generate(prompt, max_tokens=6, temperature=0.0, ignore_eos=True)
    second = tiny.generate(prompt, max_tokens=6, temperature=0.0, ignore_eos=True)
    assert second.text == first.text and first.num_input_tokens > 48
    reused = wait_for_metric(live_server, hits, "tiny_engine", lambda v: v >= hits_before + 48) - hits_before
    assert reused == (first.num_input_tokens - 1) // 16 * 16  # whole blocks, never the last prompt token
    assert (first.num_reused_tokens, second.num_reused_tokens) == (0, reused)  # the final response says so
    assert metric_value(live_server, queried, "tiny_engine") >= 2 * first.num_input_tokens
    assert metric_value(live_server, "tritonllm_kv_cache_blocks_total", "tiny_engine") > 0
    # the finished requests' blocks went back (their prefix stays cached, evictable: not in use)
    wait_for_metric(live_server, "tritonllm_kv_cache_blocks_used", "tiny_engine", lambda v: v == 0)


BAD_INPUTS = [
    (dict(prompt=""), "text_input"),
    (dict(prompt="word " * 400), "text_input"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=100000), "max_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(return_log_probs=True, top_logprobs=21), "top_logprobs"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-3), "top_k"),
    (dict(prompt="word " * 200, max_tokens=150), "max_tokens"),
]


@pytest.mark.parametrize("kw,field", BAD_INPUTS)
def test_bad_input_gets_invalid_argument_naming_the_field(tiny, kw, field):
    kw = dict(kw)
    prompt = kw.pop("prompt", "Hello")
    with pytest.raises(GenerationError) as e:
        tiny.generate(prompt, **kw)
    assert e.value.status == "INVALID_ARGUMENT", str(e.value)
    assert f"'{field}'" in str(e.value)
    assert str(e.value).count("INVALID_ARGUMENT") == 1 and "in ensemble" not in str(e.value), str(e.value)
    assert tiny.generate("Still serving?", max_tokens=3, temperature=0.0).num_output_tokens >= 1


def test_wrong_dtype_shape_and_unknown_model_are_refused(live_server, tiny):
    import numpy as np

    c = grpcclient.InferenceServerClient(live_server.grpc_url)
    try:
        text = grpcclient.InferInput("text_input", [1, 1], "BYTES")
        text.set_data_from_numpy(np.array([[b"hi"]], dtype=object))
        bad = grpcclient.InferInput("max_tokens", [1, 1], "FP32")
        bad.set_data_from_numpy(np.array([[3.0]], dtype=np.float32))
        results: queue.Queue = queue.Queue()
        c.start_stream(callback=lambda result=None, error=None: results.put(error))
        c.async_stream_infer("tiny", [text, bad])
        err = results.get(timeout=30)
        assert err is not None and "max_tokens" in str(err) and "INT32" in str(err)
        wide = grpcclient.InferInput("max_tokens", [1, 2], "INT32")  # two values where one belongs
        wide.set_data_from_numpy(np.array([[3, 4]], dtype=np.int32))
        c.async_stream_infer("tiny", [text, wide])
        err = results.get(timeout=30)
        assert err is not None and "max_tokens" in str(err)
        c.async_stream_infer("no_such_model", [text])
        err = results.get(timeout=30)
        assert err is not None and "no_such_model" in str(err)
        c.stop_stream()
    finally:
        c.close()
    assert tiny.generate("ok", max_tokens=2).num_output_tokens >= 1


def test_invalid_utf8_prompt_is_refused(live_server, tiny):
    import numpy as np

    c = grpcclient.InferenceServerClient(live_server.grpc_url)
    try:
        text = grpcclient.InferInput("text_input", [1, 1], "BYTES")
        text.set_data_from_numpy(np.array([[b"bad \xff\xfe bytes"]], dtype=object))
        results: queue.Queue = queue.Queue()
        c.start_stream(callback=lambda result=None, error=None: results.put(error))
        c.async_stream_infer("tiny", [text])
        err = results.get(timeout=30)
        assert err is not None and "text_input" in str(err) and "UTF-8" in str(err)
        c.stop_stream()
    finally:
        c.close()


def test_cancelling_a_stream_to_the_engine_frees_its_slot(live_server, tiny_dir):
    """Cancellation reaches the decoupled engine when it is addressed directly."""
    cancel_reaches_engine(live_server, "tiny_engine", TokenizerFiles(tiny_dir).encode("Cancel me"))


def test_chat_template_on_smollm2_answers(live_server):
    with LLMClient(live_server.grpc_url, "smollm2", timeout_s=120) as c:
        r = c.generate("What is the capital of France?", apply_chat_template=True, max_tokens=24, temperature=0.0)
    assert "Paris" in r.text
    assert "<|im_" not in r.text and not r.text.startswith("What is")


def test_cli_names_the_llms_served_and_an_unreachable_server(live_server, capsys):
    """The CLI's first tries as a new user makes them: no --model where the server serves several
    LLMs, a wrong --model, a port where nothing listens; each error says what to do. With --model
    named it answers."""
    from tritonllm.client.cli import main
    from tritonllm.triton.server_process import free_port

    assert main(["Hello", "--url", live_server.grpc_url, "--max-tokens", "2"]) == 1
    err = capsys.readouterr().err
    assert "serves 3 LLMs (smollm2, tiny, tiny_onehop)" in err and "--model" in err, err
    assert main(["Hello", "--url", live_server.grpc_url, "--model", "llm"]) == 1
    err = capsys.readouterr().err
    assert "[NOT_FOUND] model 'llm' is not served" in err and "smollm2, tiny, tiny_onehop" in err, err
    assert main(["Hello", "--url", f"127.0.0.1:{free_port()}"]) == 1
    err = capsys.readouterr().err
    assert "[UNAVAILABLE] no Triton server answers at 127.0.0.1:" in err and "stream is broken" not in err, err
    assert main(["Hello", "--url", live_server.grpc_url, "--model", "tiny", "--max-tokens", "3"]) == 0
    err = capsys.readouterr().err
    assert "finish_reason=length" in err and "[sampling: greedy (no --top-k/--top-p)]" in err, err
    args = ["Hello", "--url", live_server.grpc_url, "--model", "tiny", "--max-tokens", "3", "--temperature", "0.7"]
    assert main([*args, "--top-p", "0.9", "--seed", "5"]) == 0
    assert "[sampling: temperature=0.7 top_k=off top_p=0.9 seed=5]" in capsys.readouterr().err


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_through_the_ensemble_match_the_engine_in_process(tiny, tiny_dir, tiny_engine_dir, stream):
    """return_log_probs / top_logprobs through tokenizer -> engine -> detokenizer: one value per
    generated token (streamed: per response), the running sum, and the in-process engine's numbers;
    a request in between that does not ask gets none."""
    from tritonllm.config import EngineConfig
    from tritonllm.engine.inprocess import InProcessEngine

    prompt = "Log-probabilities of"
    kw = dict(max_tokens=12, temperature=0.0, ignore_eos=True, return_log_probs=True, top_logprobs=3)
    chunks = list(tiny.stream(prompt, **kw)) if stream else None
    r = tiny.generate(prompt, **kw) if not stream else None
    plain = tiny.generate(prompt, max_tokens=4)
    logprobs = [v for c in chunks for v in c.logprobs] if stream else r.logprobs
    top = [t for c in chunks for t in c.top_logprobs] if stream else r.top_logprobs
    cum = chunks[-1].cum_logprob if stream else r.cum_logprob
    cfg = EngineConfig(max_slots=2, max_context=256, max_tokens_limit=64)
    with InProcessEngine(tiny_engine_dir, cfg) as eng:
        ref = eng.generate(TokenizerFiles(tiny_dir).encode(prompt), **kw)
    assert logprobs == pytest.approx(ref.logprobs, abs=1e-5) and len(logprobs) == 12
    assert cum == pytest.approx(sum(ref.logprobs), abs=1e-4)
    assert [[i for i, _ in t] for t in top] == [ids for ids, _ in ref.top_logprobs]
    assert plain.logprobs == [] and plain.cum_logprob is None
    if stream:
        assert len(chunks) > 1 and all(len(c.logprobs) <= 12 for c in chunks)


def test_a_triton_openai_frontend_request_is_served(live_server, tiny):
    """The inputs Triton's OpenAI frontend (server repo python/openai, its TensorRT-LLM path) sends
    to an ensemble: top_p 0 (TensorRT-LLM: not set), a temperature, return_num_* flags. Greedy by
    TensorRT-LLM's rule, so the text equals a temperature-0 request's."""
    prompt = "Frontend compatibility"
    greedy = tiny.generate(prompt, max_tokens=10, temperature=0.0)
    r = tiny.generate(
        prompt,
        max_tokens=10,
        top_p=0.0,
        temperature=0.7,
        seed=3,
        frequency_penalty=0.0,
        presence_penalty=0.0,
        return_num_input_tokens=True,
        return_num_output_tokens=True,
    )
    default = tiny.generate(prompt, max_tokens=10)  # nothing set: greedy, as TensorRT-LLM
    assert r.text == greedy.text == default.text and r.num_output_tokens == greedy.num_output_tokens
