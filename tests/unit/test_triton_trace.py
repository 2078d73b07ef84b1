"""bench.triton_trace over traces a real Triton 2.51 wrote (tests/fixtures/triton_trace: two
requests to the tiny ensemble `tiny`, two to `tiny_onehop` whose engine emits text)."""

from pathlib import Path

import pytest

from bench import triton_trace

TRACE = Path(__file__).resolve().parent.parent / "fixtures" / "triton_trace" / "trace.json"


@pytest.fixture(scope="module")
def traces():
    return triton_trace.load(TRACE)


def test_entries_merge_by_id(traces):
    ensembles = [t for t in traces.values() if t.parent is None]
    assert sorted(t.model for t in ensembles) == ["tiny", "tiny", "tiny_onehop", "tiny_onehop"]
    for t in ensembles:  # each timestamp came as its own entry, the name in another
        assert t.first("GRPC_WAITREAD_END") < t.first("REQUEST_START") < t.first("GRPC_SEND_START")
        assert len(t.stamps["GRPC_SEND_START"]) >= 2  # three tokens in one or more responses
    detoks = [t for t in traces.values() if t.model == "tiny_detokenizer"]
    assert detoks and all(traces[t.parent].model == "tiny" for t in detoks)


def test_hops_add_up_to_the_first_send(traces):
    for model, detokenized in (("tiny", True), ("tiny_onehop", False)):
        hops = triton_trace.first_token_hops(traces, model)
        assert len(hops) == 2
        for h in hops:
            assert all(h[k] >= 0 for k in triton_trace.HOPS), h
            assert sum(h[k] for k in triton_trace.HOPS) == pytest.approx(h["total"], abs=1e-6)
            assert (h["detokenizer"] > 0) == detokenized
            assert h["engine"] > h["tokenizer"]  # a forward pass against a tokenization


def test_window_selects_requests_by_their_read_time(traces):
    reads = sorted(t.first("GRPC_WAITREAD_END") for t in traces.values() if t.model == "tiny" and t.parent is None)
    assert len(triton_trace.first_token_hops(traces, "tiny", reads[1], reads[1] + 1)) == 1
    assert triton_trace.first_token_hops(traces, "tiny", 0, reads[0] - 1) == []


def test_summary_and_note(traces):
    s = triton_trace.summary(triton_trace.first_token_hops(traces, "tiny"))
    assert s["requests"] == 2 and s["engine"]["p90"] >= s["engine"]["mean"] * 0.5
    assert triton_trace.describe(s).startswith("first token in Triton (trace of 2 requests")
    assert "no sampled request" in triton_trace.describe(triton_trace.summary([]))


def test_trace_args_refuse_a_rate_below_one():
    with pytest.raises(ValueError, match="trace rate 0"):
        triton_trace.trace_args(TRACE, 0)
    assert "rate=50" in triton_trace.trace_args(TRACE, 50)
