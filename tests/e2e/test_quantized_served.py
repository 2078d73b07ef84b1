"""A quantized engine through a real tritonserver: the tiny model's int8 graph (ONNX Runtime's
MatMulNBits), built by the pipeline into a repository of its own, answers with the ids of the same
graph in-process, and its served config names the scheme."""

import os

import pytest
import tritonclient.grpc as g

from tritonllm.config import EngineConfig
from tritonllm.engine.inprocess import InProcessEngine
from tritonllm.text import TokenizerFiles

from ..conftest import BUILD, TINY_ENGINE
from ..parity.test_engine_parity import PROMPTS
from .helpers import engine_output_ids


def int8_graph(tiny_dir, tiny_engine_dir):
    """The tiny model's int8 graph as the build makes it (calibrated on the built-in text)."""
    from tritonllm.build.pipeline import quantized_graph

    return quantized_graph(tiny_engine_dir, EngineConfig(quantization="int8"), tiny_dir)


@pytest.fixture(scope="module")
def int8_server(tmp_path_factory, tiny_dir, tiny_engine_dir):
    from tritonllm.build.repository import RepositoryConfig, write_repository
    from tritonllm.triton.server_process import TritonServer

    repo = tmp_path_factory.mktemp("int8_repository")
    cfg = EngineConfig(**TINY_ENGINE, quantization="int8")
    graph = int8_graph(tiny_dir, tiny_engine_dir)
    write_repository(repo, RepositoryConfig(name="tiny_int8", engine=cfg), tiny_dir, graph)
    srv = TritonServer(repo, log_dir=BUILD / "logs" / "tests" / f"int8-{os.getpid()}")
    srv.start()
    yield srv
    srv.stop()


def test_the_int8_engine_serves_the_ids_of_its_graph_in_process(int8_server, tiny_dir, tiny_engine_dir):
    ids = TokenizerFiles(tiny_dir).encode(PROMPTS[0])
    served = engine_output_ids(int8_server.grpc_url, "tiny_int8_engine", ids, 12)
    cfg = EngineConfig(**TINY_ENGINE, quantization="int8")
    with InProcessEngine(int8_graph(tiny_dir, tiny_engine_dir), cfg) as eng:
        local = eng.generate(ids, max_tokens=12, temperature=0.0, ignore_eos=True).ids
    assert served == local and len(served) == 12
    config = g.InferenceServerClient(int8_server.grpc_url).get_model_config("tiny_int8_engine").config
    assert config.parameters["quantization"].string_value == "int8"
