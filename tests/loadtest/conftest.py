import shutil
from pathlib import Path

import pytest

from tritonllm.pbtxt import Enum, render

HERE = Path(__file__).parent


def timing_config() -> dict:
    def t(name, dtype, dims, optional=False):
        d = {"name": name, "data_type": Enum(f"TYPE_{dtype}"), "dims": dims}
        if optional:
            d["optional"] = True
        return d

    return {"name": "timing", "backend": "python", "max_batch_size": 64,
            "input": [t("text_input", "STRING", [1]), t("max_tokens", "INT32", [1], True), t("stream", "BOOL", [1], True)],
            "output": [t("text_output", "STRING", [-1]), t("num_output_tokens", "INT32", [1]),
                       t("finish_reason", "STRING", [1])],
            "model_transaction_policy": {"decoupled": True},
            "instance_group": [{"count": 1, "kind": Enum("KIND_CPU")}]}


@pytest.fixture(scope="session")
def timing_server(tmp_path_factory):
    from tritonllm.server import TritonServer

    repo = tmp_path_factory.mktemp("timing_repo")
    (repo / "timing" / "1").mkdir(parents=True)
    shutil.copy(HERE / "timing_model" / "model.py", repo / "timing" / "1" / "model.py")
    (repo / "timing" / "config.pbtxt").write_text(render(timing_config()))
    server = TritonServer(repo, log_dir=Path("build/logs/tests/timing"))
    server.start()
    yield server
    server.stop()
