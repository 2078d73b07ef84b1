"""Which prefills replay a captured graph and which launch eagerly (`Buckets.prefill_bucket`)."""

from tritonllm.runtimes.torch_cuda.graphs import PREFILL_GRAPH_TOKENS, Buckets


def test_small_prefills_replay_their_bucket_whatever_the_padding():
    bk = Buckets.for_engine(1024, 512)
    assert bk.prefill_bucket(1, 100) == (1, 128)
    assert bk.prefill_bucket(5, 128) == (6, 128)  # 768 tokens: the launches would cost more than the padding
    assert bk.prefill_bucket(7, 128) == (8, 128)


def test_a_large_prefill_its_bucket_pads_by_more_than_a_tenth_launches_eagerly():
    bk = Buckets.for_engine(1024, 512)
    assert bk.prefill_bucket(25, 128) is None  # 32 x 128 would compute 28 % padding
    assert bk.prefill_bucket(13, 128) is None  # 16 x 128: 23 %
    assert bk.prefill_bucket(11, 128) == (12, 128)  # 9 %: replayed
    assert bk.prefill_bucket(32, 128) == (32, 128)
    assert bk.prefill_bucket(46, 128) == (48, 128)
    assert bk.prefill_bucket(16, 120) == (16, 128)  # the length bucket pads 7 %


def test_prefills_beyond_the_graph_limit_launch_eagerly():
    bk = Buckets.for_engine(1024, 512)
    assert bk.prefill_bucket(64, 128) == (64, 128)
    assert 96 * 128 > PREFILL_GRAPH_TOKENS and bk.prefill_bucket(80, 128) is None
    assert bk.prefill_bucket(16, 512) == (16, 512) and bk.prefill_bucket(17, 512) is None
