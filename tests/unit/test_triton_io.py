"""The python-backend request reader over a stand-in request (the real one is exercised by the
end-to-end tests): inputs listed once, typed reads, errors that name the field and the fix."""

import numpy as np
import pytest

from tritonllm.errors import RequestValidationError
from tritonllm.triton.backend_io import RequestReader


class Tensor:
    def __init__(self, name, array):
        self._name, self._array = name, np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


class Request:
    def __init__(self, **inputs):
        self.listed = 0
        self._inputs = [Tensor(k, v) for k, v in inputs.items()]

    def inputs(self):
        self.listed += 1
        return list(self._inputs)


def test_reads_typed_values_and_defaults_listing_the_inputs_once():
    req = Request(
        max_tokens=[[7]],
        temperature=np.array([[0.5]], np.float32),
        ignore_eos=[[True]],
        stop_words=np.array([[b"END", "x"]], dtype=object),
        input_ids=[[1, 2, 3]],
    )
    read = RequestReader(req)
    assert read.scalar("max_tokens", int) == 7 and read.scalar("temperature", float) == 0.5
    assert read.scalar("ignore_eos", bool) is True and read.scalar("seed", int) is None
    assert read.scalar("top_k", int, 0) == 0
    assert read.strings("stop_words") == ["END", "x"] and read.strings("bad_words") == []
    assert read.ints("input_ids") == [1, 2, 3]
    assert req.listed == 1


def test_errors_name_the_field_and_the_fix():
    read = RequestReader(Request(max_tokens=[[1, 2]], stop_words=np.array([[b"\xff"]], dtype=object)))
    with pytest.raises(RequestValidationError, match="max_tokens.*exactly one value"):
        read.scalar("max_tokens", int)
    with pytest.raises(RequestValidationError, match="stop_words.*valid UTF-8"):
        read.strings("stop_words")


def test_repeated_strings_are_encoded_once():
    class Pb:
        @staticmethod
        def Tensor(name, arr):
            return name, arr

    from tritonllm.triton.backend_io import strings_tensor

    (_, a), (_, b) = strings_tensor(Pb, "stop_words", ("END", "é")), strings_tensor(Pb, "stop_words", ("END", "é"))
    assert a is b and a.shape == (1, 2) and a.tolist() == [[b"END", "é".encode()]]
    assert not a.flags.writeable


def test_metric_samples_keep_the_names_the_page_uses():
    """Triton's counters have no `_total` suffix, ours do; histogram samples keep theirs."""
    from tritonllm.triton.scrape import metric_samples

    page = (
        "# HELP nv_inference_request_success Number of successful inference requests\n"
        "# TYPE nv_inference_request_success counter\n"
        'nv_inference_request_success{model="m_tokenizer",version="1"} 3\n'
        "# HELP tritonllm_tokens_generated_total tokens generated\n"
        "# TYPE tritonllm_tokens_generated_total counter\n"
        'tritonllm_tokens_generated_total{model="m_engine"} 42\n'
        "# TYPE tritonllm_time_to_first_token_seconds histogram\n"
        'tritonllm_time_to_first_token_seconds_bucket{model="m_engine",le="0.1"} 1\n'
        'tritonllm_time_to_first_token_seconds_bucket{model="m_engine",le="+Inf"} 2\n'
        'tritonllm_time_to_first_token_seconds_sum{model="m_engine"} 0.3\n'
        'tritonllm_time_to_first_token_seconds_count{model="m_engine"} 2\n'
    )
    samples = metric_samples(page)
    assert samples[0] == ("nv_inference_request_success", {"model": "m_tokenizer", "version": "1"}, 3.0)
    assert samples[1] == ("tritonllm_tokens_generated_total", {"model": "m_engine"}, 42.0)
    assert [s[0] for s in samples[2:]] == ["tritonllm_time_to_first_token_seconds_bucket"] * 2 + [
        "tritonllm_time_to_first_token_seconds_sum",
        "tritonllm_time_to_first_token_seconds_count",
    ]
    assert samples[3][1]["le"] == "+Inf"


def test_logprobs_pack_into_one_tensor_and_back():
    from tritonllm.tensors import LogProbs

    lp = LogProbs([-0.5, -1.25], [[(7, -0.5), (3, -2.0)], [(131071, -1.25), (0, -1.5)]], -1.75)
    back = LogProbs.unpack([float(v) for v in np.asarray(lp.pack(), dtype=np.float32)])
    assert back == lp
    plain = LogProbs([-0.5], [], -0.5)
    assert LogProbs.unpack(plain.pack()) == plain and LogProbs.unpack(LogProbs([], [], 0.0).pack()).logprobs == []
