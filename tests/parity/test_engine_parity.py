"""The engine (ONNX Runtime, in-process, in-flight batched) against transformers' greedy
`generate`: exact token ids, on the tiny random model and on SmolLM2-135M-Instruct."""

from dataclasses import replace

import pytest
import torch

from tritonllm.config import EngineConfig
from tritonllm.engine.inprocess import InProcessEngine
from tritonllm.model.modeling import load_hf
from tritonllm.text import TokenizerFiles

PROMPTS = ["The quick brown fox", "Once upon a time, in a land far away,", "1, 2, 3,", "Paris is the capital of"]


def hf_greedy(model, ids, n):
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            pad_token_id=model.config.eos_token_id,
        )
    return out[0, len(ids) :].tolist()


def strip_eos(ids, eos):
    return ids[: ids.index(eos)] if eos in ids else ids


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_greedy_ids_match_hf_generate_with_concurrent_requests(which, request):
    ckpt = request.getfixturevalue(f"{which}_dir")
    engine_dir = request.getfixturevalue(f"{which}_engine_dir")
    n = 24 if which == "tiny" else 16
    tok = TokenizerFiles(ckpt)
    hf = load_hf(ckpt)
    prompts = [tok.encode(p) for p in PROMPTS]
    expected = [hf_greedy(hf, ids, n) for ids in prompts]
    cfg = EngineConfig(max_slots=4, max_context=256, max_tokens_limit=128, threads=2)
    with InProcessEngine(engine_dir, cfg) as eng:
        sinks = [eng.submit(ids, max_tokens=n, temperature=0.0, ignore_eos=True) for ids in prompts]
        got = [s.wait(120).ids for s in sinks]
        assert eng.loop.stats.batched_decode_steps > 0  # they really were batched together
    for p, e, g in zip(PROMPTS, expected, got):
        first_diff = next((i for i, (a, b) in enumerate(zip(e, g)) if a != b), None)
        assert g == e, f"{which} {p!r}: first divergence at token {first_diff}"


def test_eos_stops_like_hf(tiny_dir, tiny_engine_dir):
    """Without ignore_eos the engine stops where HF would (EOS not emitted)."""
    hf = load_hf(tiny_dir)
    tok = TokenizerFiles(tiny_dir)
    ids = tok.encode("Hello")
    with InProcessEngine(tiny_engine_dir, EngineConfig(max_slots=2, max_context=256, max_tokens_limit=64)) as eng:
        got = eng.generate(ids, max_tokens=40, temperature=0.0)
    eos = hf.config.eos_token_id
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=40, pad_token_id=eos)[
            0, len(ids) :
        ].tolist()
    assert got.ids == strip_eos(ref, eos)
    assert got.finish_reason == ("stop" if eos in ref else "length")


@pytest.mark.parametrize("runtime", ["onnxruntime", "torch-reference-ops", "torch-fused-ops"])
def test_chunked_prefill_gives_hf_greedy_ids_and_the_same_seeded_samples(tiny_dir, tiny_engine_dir, runtime):
    """Prompts longer than max_prefill_tokens go in 16-token pieces over several steps (each piece
    reads the cached past: ONNX Runtime's graph, the torch runtime's pieces), next to other
    requests' decodes: greedy ids equal HF's, and a seeded sampled request gets the same ids as
    with its prompt prefilled whole."""
    from tritonllm.model.modeling import CausalLM
    from tritonllm.runtimes.torch_cuda import TorchCudaRuntime

    hf, tok = load_hf(tiny_dir), TokenizerFiles(tiny_dir)
    prompts = [tok.encode(" ".join(PROMPTS * 2)), tok.encode(PROMPTS[1] * 4), tok.encode(PROMPTS[0])]
    assert min(len(p) for p in prompts[:2]) > 2 * 16
    base = EngineConfig(max_slots=2, max_context=256, max_tokens_limit=64, threads=2)
    chunked = EngineConfig(**{**base.__dict__, "max_prefill_tokens": 16})

    def engine(cfg):
        if runtime == "onnxruntime":
            return InProcessEngine(tiny_engine_dir, cfg)
        fused = runtime == "torch-fused-ops"
        return InProcessEngine(
            None, cfg, runtime=TorchCudaRuntime(None, cfg, model=CausalLM(hf), device="cpu", fused_kernels=fused)
        )

    kw = dict(max_tokens=12, ignore_eos=True)
    with engine(chunked) as eng:
        got = [s.wait(120).ids for s in [eng.submit(ids, temperature=0.0, **kw) for ids in prompts]]
        pieces = eng.loop.stats.prefill_steps
        sampled = eng.generate(prompts[1], temperature=0.9, top_k=20, seed=7, **kw).ids
    assert got == [hf_greedy(hf, ids, 12) for ids in prompts]
    assert pieces >= sum(-(-len(p) // 16) for p in prompts[:2])  # the long prompts took several steps
    with engine(base) as eng:
        assert eng.generate(prompts[1], temperature=0.9, top_k=20, seed=7, **kw).ids == sampled


def test_onnx_decode_staging_is_dropped_when_a_slot_is_prefilled_again(tiny_dir, tiny_engine_dir):
    """The staged decode past must not outlive a new prompt in the same slot: slot 0 decodes one
    prompt, then takes another (a prefill-only step) and decodes again with the same slots; its
    logits equal a fresh runtime's for that prompt (to float rounding: its staged past is longer)."""
    import numpy as np

    from tritonllm.runtimes.base import StepInput
    from tritonllm.runtimes.onnx_runtime import OnnxRuntime

    tok = TokenizerFiles(tiny_dir)
    first, second = tok.encode(PROMPTS[1]), tok.encode(PROMPTS[3])
    cfg = EngineConfig(max_slots=2, max_context=128, max_tokens_limit=64, threads=2)

    def decode_after(rt, prompt, steps=3):
        out = rt.step([StepInput(0, prompt, 0)])
        for k in range(steps):
            out = rt.step([StepInput(0, [int(out[0].argmax())], len(prompt) + k)])
        return out

    reused, fresh = OnnxRuntime(tiny_engine_dir, cfg), OnnxRuntime(tiny_engine_dir, cfg)
    decode_after(reused, first, steps=5)
    np.testing.assert_allclose(decode_after(reused, second), decode_after(fresh, second), rtol=1e-4, atol=1e-4)


def hf_greedy_logprobs(model, ids, n):
    """HF greedy ids (up to EOS, not included) and each step's log-softmax of its raw logits
    (float64). No EOS masking: a request with ignore_eos or min_tokens gets the log-probabilities
    of the distribution it draws from, without the EOS ids."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            do_sample=False,
            max_new_tokens=n,
            pad_token_id=model.config.eos_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
    steps = [torch.log_softmax(step[0].double(), -1) for step in out.logits]
    return strip_eos(out.sequences[0, len(ids) :].tolist(), model.config.eos_token_id), steps


LOGPROB_TOL = 1e-3  # fp32 engines against HF's fp32 logits (measured differences are below 1e-4)


def assert_logprobs_match(got, want_ids, steps, k):
    assert got.ids == want_ids
    assert len(got.logprobs) == len(want_ids) == len(got.top_logprobs)
    for i, (tok, lp, (top_ids, top_lps)) in enumerate(zip(want_ids, got.logprobs, got.top_logprobs)):
        ref = steps[i]
        assert lp == pytest.approx(float(ref[tok]), abs=LOGPROB_TOL), f"token {i}"
        assert top_lps == pytest.approx(torch.topk(ref, k).values.tolist(), abs=LOGPROB_TOL), f"token {i}"
        assert [float(ref[t]) for t in top_ids] == pytest.approx(top_lps, abs=LOGPROB_TOL)
        assert top_ids[0] == tok  # greedy: the chosen token is the most likely


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_logprobs_match_hf_log_softmax(which, request):
    ckpt = request.getfixturevalue(f"{which}_dir")
    engine_dir = request.getfixturevalue(f"{which}_engine_dir")
    tok, hf = TokenizerFiles(ckpt), load_hf(ckpt)
    prompts = [tok.encode(p) for p in PROMPTS[:2]]
    want = [hf_greedy_logprobs(hf, ids, 8) for ids in prompts]
    cfg = EngineConfig(max_slots=2, max_context=256, max_tokens_limit=64, threads=2)
    with InProcessEngine(engine_dir, cfg) as eng:
        kw = dict(max_tokens=8, temperature=0.0, return_log_probs=True, top_logprobs=5)
        got = [s.wait(120) for s in [eng.submit(ids, **kw) for ids in prompts]]
    for g, (ids, steps) in zip(got, want):
        assert_logprobs_match(g, ids, steps, 5)


def test_prefix_cache_reuse_gives_the_ids_of_a_cold_run(tiny_dir, tiny_engine_dir):
    """Prompts sharing a 3-block prefix, one at a time and then together, prompts whole and in
    40-token pieces, in a pool small enough that cached blocks are evicted: the same greedy ids as
    HF, and most of the shared prefix was found in the cache (not computed again)."""
    hf, tok = load_hf(tiny_dir), TokenizerFiles(tiny_dir)
    shared = tok.encode("You are a careful assistant who answers in full sentences. " * 4)[:48]
    prompts = [shared + tok.encode(f" Question {i}: what comes after {i}?") for i in range(4)]
    want = [hf_greedy(hf, p, 8) for p in prompts]
    for budget in (8192, 40):
        cfg = EngineConfig(
            max_slots=2, max_context=96, max_tokens_limit=32, default_max_tokens=8, max_prefill_tokens=budget
        )
        with InProcessEngine(tiny_engine_dir, cfg) as eng:
            kw = dict(max_tokens=8, temperature=0.0, ignore_eos=True)
            first = [eng.generate(p, **kw) for p in prompts[:2]]
            together = [s.wait(60) for s in [eng.submit(p, **kw) for p in prompts]]
            hits = eng.loop.stats.prefix_hits
        assert [r.ids for r in first] == want[:2] and [r.ids for r in together] == want, f"budget {budget}"
        assert first[0].reused_tokens == 0 and first[1].reused_tokens == len(shared) // 16 * 16  # whole blocks
        assert sum(r.reused_tokens for r in first + together) == hits  # each response's share of the metric
        # of the five later prompts at least three found the shared blocks (one may have lost them to
        # eviction); a 40-token piece reuses its two whole blocks, never its last token
        assert hits >= 3 * (48 if budget > 48 else 32), (budget, hits)


@pytest.mark.parametrize("runtime", ["onnxruntime", "torch-reference-ops"])
def test_a_cold_burst_sharing_a_prefix_computes_it_once_with_hf_ids(tiny_dir, tiny_engine_dir, runtime):
    """Four prompts with the same new 80-token prefix arrive in one pass of the loop: the three
    others reuse the first one's five blocks (ONNX Runtime computes a step's prompts in turn; the
    torch runtime batches them, so the scheduler holds the three back a step); greedy ids equal HF's."""
    from tritonllm.engine.inprocess import QueueSink
    from tritonllm.engine.loop import EngineLoop
    from tritonllm.engine.request import DictReader, build_sequence
    from tritonllm.model.modeling import CausalLM
    from tritonllm.runtimes import load_runtime
    from tritonllm.runtimes.torch_cuda import TorchCudaRuntime

    hf, tok = load_hf(tiny_dir), TokenizerFiles(tiny_dir)
    shared = tok.encode("A system prompt every request of the burst starts with, word for word. " * 6)[:80]
    prompts = [shared + tok.encode(f" Request {i} asks about {i * 7}.") for i in range(4)]
    cfg = EngineConfig(max_slots=4, max_context=160, max_tokens_limit=32, default_max_tokens=8, threads=2)
    if runtime == "onnxruntime":
        rt = load_runtime(cfg, tiny_engine_dir)
    else:
        rt = TorchCudaRuntime(None, cfg, model=CausalLM(hf), device="cpu", fused_kernels=False)
    loop = EngineLoop(rt, cfg)
    sinks = []
    for p in prompts:  # all queued before the loop starts: they meet in its first pass
        seq = build_sequence(DictReader({"input_ids": p, "max_tokens": 8, "ignore_eos": True}), cfg, rt.shape)
        seq.sink = QueueSink()
        sinks.append(seq.sink)
        loop.submit(seq)
    loop.start()
    try:
        got = [s.wait(120) for s in sinks]
    finally:
        loop.stop()
    assert [g.ids for g in got] == [hf_greedy(hf, p, 8) for p in prompts]
    assert [s.reused_tokens for s in sinks] == [0, 80, 80, 80]
    assert loop.scheduler.prefix_waits == (0 if runtime == "onnxruntime" else 1)


def test_onnx_threads_that_sleep_between_ops_give_the_same_logits(tiny_dir, tiny_engine_dir):
    """ort_spin_wait=False: ONNX Runtime's compute threads sleep between ops instead of spinning;
    ort_spin_after_run off: they stop spinning as a step's Run returns (the sessions say so), and a
    prompt's logits are those of the spinning default."""
    from tritonllm.runtimes.base import StepInput
    from tritonllm.runtimes.onnx_runtime import OnnxRuntime

    prompt = TokenizerFiles(tiny_dir).encode(PROMPTS[0])
    cfg = EngineConfig(max_slots=1, max_context=64, max_tokens_limit=32, default_max_tokens=8, threads=2)
    spin, sleep = OnnxRuntime(tiny_engine_dir, cfg), OnnxRuntime(tiny_engine_dir, replace(cfg, ort_spin_wait=False))
    stop = OnnxRuntime(tiny_engine_dir, replace(cfg, ort_spin_after_run="off"))
    entries = ("session.intra_op.allow_spinning", "session.force_spinning_stop")
    assert [sleep.session.get_session_options().get_session_config_entry(e) for e in entries[:1]] == ["0"]
    assert [stop.session.get_session_options().get_session_config_entry(e) for e in entries[1:]] == ["1"]
    for entry in entries:  # ONNX Runtime's defaults: spin, and go on spinning after a Run
        with pytest.raises(RuntimeError, match="does not have configuration"):
            spin.session.get_session_options().get_session_config_entry(entry)
    want = torch.as_tensor(spin.step([StepInput(0, prompt, 0)]))
    for other in (sleep, stop):
        torch.testing.assert_close(torch.as_tensor(other.step([StepInput(0, prompt, 0)])), want)
