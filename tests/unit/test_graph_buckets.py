"""Which prefills replay a captured graph, on which bucket (`Buckets.prefill_bucket`)."""

from tritonllm.runtimes.torch_cuda.graphs import PREFILL_GRAPH_TOKENS, Buckets


def test_prefill_batch_buckets_step_by_a_quarter_from_sixteen():
    bk = Buckets.for_engine(1024, 512)
    assert bk.prefill_batch[:16] == [1, 2, 3, 4, 6, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64]
    assert bk.prefill_batch[-4:] == [640, 768, 896, 1024]
    assert Buckets.for_engine(50, 512).prefill_batch[-3:] == [40, 48, 50]  # capped at max_slots
    assert bk.batch == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]  # decode keeps powers of two


def test_prefills_replay_their_bucket_whatever_the_padding():
    bk = Buckets.for_engine(1024, 512)
    assert bk.prefill_bucket(1, 100) == (1, 128)
    assert bk.prefill_bucket(5, 128) == (6, 128)
    assert bk.prefill_bucket(13, 128) == (16, 128)  # 23 % padding rows: still a graph
    assert bk.prefill_bucket(25, 128) == (28, 128)  # 12 %, where the 32-prompt graph padded 28 %
    assert bk.prefill_bucket(33, 128) == (40, 128)  # 21 %
    assert bk.prefill_bucket(46, 128) == (48, 128)
    assert bk.prefill_bucket(16, 120) == (16, 128)


def test_padding_rows_stay_under_a_quarter_from_sixteen_prompts():
    bk = Buckets.for_engine(1024, 512)
    for b in range(16, 1025):
        bb, _ = bk.prefill_bucket(b, 8) or (b, 8)
        assert bb >= b and bb - b < 0.25 * b, b


def test_prefills_beyond_the_graph_limit_launch_eagerly():
    bk = Buckets.for_engine(1024, 512)
    assert bk.prefill_bucket(64, 128) == (64, 128)
    assert 80 * 128 > PREFILL_GRAPH_TOKENS and bk.prefill_bucket(65, 128) is None
    assert bk.prefill_bucket(16, 512) == (16, 512) and bk.prefill_bucket(17, 512) is None
