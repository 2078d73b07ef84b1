"""bench.profile_loop's closed-loop streams (`--churn`): each stream's final response submits its
next request, so prompts keep arriving while others decode."""

from bench.profile_loop import host_ms_per_step


def test_churned_streams_run_every_request_and_prefill_as_they_arrive():
    row = host_ms_per_step("instant", batch=4, tokens=6, steps_per_launch=1, churn=3, prompt=20)
    # 4 streams x 3 requests of 6 tokens, each request's prompt its own prefill at least once
    assert row["churn"] == 3 and row["prompt"] == 20
    assert row["prefill_steps"] >= 3 and row["steps"] >= 3 * 6
    once = host_ms_per_step("instant", batch=4, tokens=6, steps_per_launch=1)
    assert once["prefill_steps"] == 1 and once["steps"] == 6  # one wave: queued together, prefilled together
