"""The container recipe without a container: a fresh venv holding exactly the Dockerfile's runtime
list (plus nvidia-pytriton for the same 2.51 server binary the image brings) serves a built
repository with the Dockerfile CMD's command line, and streams an answer. The python stubs are
checked to run from that venv: the ONNX Runtime they loaded is the venv's."""

import json
import re
import subprocess
import sys
from pathlib import Path

import psutil

from tritonllm.triton.server_process import SERVER_FLAGS, TritonServer

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "deploy" / "Dockerfile").read_text()


def dockerfile_requirements() -> Path:
    runtime = re.search(r"^ARG RUNTIME=(\S+)$", DOCKERFILE, re.M).group(1)
    src = re.search(r"^COPY (tritonllm/build/requirements/\$\{RUNTIME\}\.txt) ", DOCKERFILE, re.M).group(1)
    return ROOT / src.replace("${RUNTIME}", runtime)


def dockerfile_cmd() -> list[str]:
    return json.loads(re.search(r"^CMD (\[.*\])$", DOCKERFILE, re.M).group(1))


def pinned(requirements: Path) -> list[str]:
    return [line for line in requirements.read_text().splitlines() if line and not line.startswith("#")]


def lock_version(package: str) -> str:
    lock = (ROOT / "requirements.lock").read_text()
    return re.search(rf"^{re.escape(package)}==\S+$", lock, re.M | re.I).group(0)


def fresh_venv(venv: Path, *pip_args) -> Path:
    """A new venv at `venv` holding what `pip install *pip_args` brings; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *pip_args]
    r = subprocess.run([str(a) for a in install], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return python


def test_the_dockerfile_cmd_is_the_harness_command_line():
    """CMD = tritonserver, the repository, SERVER_FLAGS: what every test's server runs, less the
    harness's wheel layout, loopback addresses and ports."""
    cmd = dockerfile_cmd()
    assert cmd[:2] == ["tritonserver", "--model-repository=/models"] and cmd[2:] == SERVER_FLAGS


def test_a_venv_with_only_the_runtime_list_serves_the_repository(tiny_dir, tiny_engine_dir, tmp_path):
    from tritonllm.build.repository import RepositoryConfig, write_repository
    from tritonllm.client import LLMClient
    from tritonllm.config import EngineConfig

    requirements = dockerfile_requirements()
    assert all("==" in line for line in pinned(requirements)), "the runtime list pins every package"
    venv = tmp_path / "venv"
    python = fresh_venv(venv, "-r", requirements, lock_version("nvidia-pytriton"))
    installed = subprocess.run([python, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True).stdout
    assert "torch" not in installed and "transformers" not in installed  # nothing of the build side

    repo = write_repository(
        tmp_path / "models",
        RepositoryConfig(
            name="llm", engine=EngineConfig(max_slots=2, max_context=256, max_tokens_limit=128, threads=1)
        ),
        tiny_dir,
        tiny_engine_dir,
    )
    with TritonServer(repo, python=str(python), log_dir=tmp_path / "logs") as server:
        assert server.command()[1:2] == ["--model-repository=" + str(repo)] and server.command()[-2:] == SERVER_FLAGS
        with LLMClient(server.grpc_url) as client:  # the only LLM served
            chunks = list(client.stream("Hello from the container recipe", max_tokens=8, temperature=0.0))
        assert chunks[-1].final and chunks[-1].num_output_tokens == 8
        children = psutil.Process(server._proc.pid).children(recursive=True)
        stubs = [p for p in children if "_engine/" in " ".join(p.cmdline())]
        loaded = {m.path for p in stubs for m in p.memory_maps() if "onnxruntime_pybind11_state" in m.path}
        assert loaded and all(path.startswith(str(venv)) for path in loaded), loaded


def test_the_gateway_image_recipe_runs_from_its_requirement_list(live_server, model_repository, tmp_path):
    """deploy/Dockerfile.openai without a container: a fresh venv with exactly its requirement list,
    the tritonllm package copied (not installed) as the image does, its ENTRYPOINT's command line
    (bound to loopback here); it lists the LLMs and answers a completion."""
    import os
    import shutil
    import time

    import httpx

    from tritonllm.triton.server_process import free_port

    text = (ROOT / "deploy" / "Dockerfile.openai").read_text()
    src = re.search(r"^COPY (\S+) /opt/tritonllm/requirements.txt$", text, re.M).group(1)
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))
    python = fresh_venv(tmp_path / "venv", "-r", ROOT / src)
    shutil.copytree(ROOT / "tritonllm", tmp_path / "opt" / "tritonllm", ignore=shutil.ignore_patterns("__pycache__"))
    port = free_port()
    argv = [
        str(python),
        *entry[1:],
        "--triton",
        live_server.grpc_url,
        "--repository",
        str(model_repository),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "opt"))
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).json()
                break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline, (
                    proc.stdout.read() if proc.poll() else "slow"
                )
                time.sleep(0.2)
        assert sorted(m["id"] for m in models["data"]) == ["smollm2", "tiny", "tiny_onehop"]
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60).json()
        assert answer["usage"]["completion_tokens"] == 4, answer
    finally:
        proc.terminate()
        proc.wait(10)
