"""Client-side pieces that need no server: choosing the model from a repository index, and
errors that name their gRPC status once."""

from types import SimpleNamespace

import pytest

from tritonllm.client.llm_client import GenerationError, resolve_model


class Index:
    """A repository index as tritonclient returns it (`.models`, each with `.name`)."""

    def __init__(self, *names):
        self.names = names

    def get_model_repository_index(self):
        return SimpleNamespace(models=[SimpleNamespace(name=n) for n in self.names])


ONE_LLM = Index("smollm2", "smollm2_tokenizer", "smollm2_engine", "smollm2_detokenizer", "other_model")


def test_the_default_model_is_the_only_llm_in_the_index():
    assert resolve_model(ONE_LLM, "url", None) == "smollm2"
    assert resolve_model(ONE_LLM, "url", "other_model") == "other_model"  # any served model may be named


def test_several_llms_or_an_unknown_name_are_refused_with_the_llms_listed():
    two = Index("a", "a_engine", "b", "b_engine", "b_tokenizer")
    with pytest.raises(GenerationError, match=r"serves 2 LLMs \(a, b\): choose one with --model"):
        resolve_model(two, "url", None)
    with pytest.raises(GenerationError, match=r"model 'llm' is not served at url; LLMs there: smollm2") as e:
        resolve_model(ONE_LLM, "url", "llm")
    assert e.value.status == "NOT_FOUND"


def test_an_index_that_cannot_be_read_means_no_server_answers():
    class Down:
        def get_model_repository_index(self):
            raise ConnectionError("connection refused")

    with pytest.raises(GenerationError, match="no Triton server answers at 127.0.0.1:1") as e:
        resolve_model(Down(), "127.0.0.1:1", None)
    assert e.value.status == "UNAVAILABLE"


@pytest.mark.parametrize(
    "message",
    [
        "in ensemble 'smollm2', [INVALID_ARGUMENT] invalid 'max_tokens' = 0: use 1..256",
        "[INVALID_ARGUMENT] invalid 'max_tokens' = 0: use 1..256",
    ],
)
def test_a_stream_error_names_its_status_once(message):
    err = GenerationError.from_triton(SimpleNamespace(message=lambda: message))
    assert err.status == "INVALID_ARGUMENT"
    assert str(err) == "[INVALID_ARGUMENT] invalid 'max_tokens' = 0: use 1..256"
