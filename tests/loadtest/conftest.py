from pathlib import Path

import pytest

from loadtests.timing_reference import write_timing_repository


@pytest.fixture(scope="session")
def timing_server(tmp_path_factory):
    from tritonllm.triton.server_process import TritonServer

    repo = write_timing_repository(tmp_path_factory.mktemp("timing_repo"))
    server = TritonServer(repo, log_dir=Path("build/logs/tests/timing"))
    server.start()
    yield server
    server.stop()
