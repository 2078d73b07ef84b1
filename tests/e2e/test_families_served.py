"""Every model family end to end through a real tritonserver: one repository holding a tiny random
checkpoint of each (ONNX Runtime engines, the embedded default), its greedy ids and text equal to
HF `generate`, and its chat turn format rendered by the tokenizer stage exactly as transformers'
apply_chat_template renders it."""

import json
import os

import pytest

from tritonllm.client import LLMClient
from tritonllm.model.modeling import load_hf
from tritonllm.text import TokenizerFiles

from ..conftest import BUILD
from ..family_models import family_checkpoint
from ..parity.test_engine_parity import hf_greedy
from .helpers import engine_output_ids

SERVED = ["qwen2", "qwen3", "mistral", "phi3", "gemma", "gemma2", "gemma3"]
ENGINE = dict(max_slots=2, max_context=256, max_queue=8, max_tokens_limit=64, threads=1)
PROMPT = "Once upon a time, in a land far away, there lived"  # longer than the windows
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


def model_name(family: str) -> str:
    return family.replace("-", "_")


@pytest.fixture(scope="module")
def family_server(tmp_path_factory, smollm2_dir):
    from tritonllm.build.pipeline import engine_files
    from tritonllm.build.repository import RepositoryConfig, write_repository
    from tritonllm.config import EngineConfig
    from tritonllm.triton.server_process import TritonServer

    repo = tmp_path_factory.mktemp("family_repository")
    cfg = EngineConfig(**ENGINE)
    for family in SERVED:
        ckpt = family_checkpoint(family, smollm2_dir)
        engine_dir = engine_files(ckpt, f"tiny-{family}", cfg, BUILD / "onnx" / f"tiny-{family}")
        write_repository(repo, RepositoryConfig(name=model_name(family), engine=cfg), ckpt, engine_dir)
    srv = TritonServer(repo, log_dir=BUILD / "logs" / "tests" / f"families-{os.getpid()}")
    srv.start()
    yield srv
    srv.stop()


def hf_chat_ids(ckpt, messages) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


@pytest.mark.parametrize("family", SERVED)
def test_served_family_answers_as_hf_generate(family_server, family, smollm2_dir):
    ckpt = family_checkpoint(family, smollm2_dir)
    hf, tok, name = load_hf(ckpt), TokenizerFiles(ckpt), model_name(family)
    ids = tok.encode(PROMPT)
    want = hf_greedy(hf, ids, 12)
    assert engine_output_ids(family_server.grpc_url, f"{name}_engine", ids, 12) == want
    chat_ids = hf_chat_ids(ckpt, CHAT)
    with LLMClient(family_server.grpc_url, name, timeout_s=120) as client:
        plain = client.generate(PROMPT, max_tokens=12, temperature=0.0, ignore_eos=True)
        chat = client.generate(
            json.dumps(CHAT), apply_chat_template=True, max_tokens=8, temperature=0.0, ignore_eos=True
        )
    assert plain.text == tok.decode(want) and plain.num_input_tokens == len(ids)
    assert chat.num_input_tokens == len(chat_ids)  # the family's template, rendered as transformers does
    assert chat.text == tok.decode(hf_greedy(hf, chat_ids, 8))
