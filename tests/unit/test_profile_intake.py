"""bench.profile_intake: requests fed over a pipe reach a busy loop and get their first tokens."""

from bench.profile_intake import measure


def test_fed_requests_are_handed_to_the_loop_and_answered():
    row = measure(batch=8, rate=200.0, n=10, switch_ms=1.0)
    assert row["requests"] == 10
    assert 0 <= row["to_loop_ms_p50"] <= row["to_first_token_ms_p50"]
    assert row["to_first_token_ms_p99"] is not None
