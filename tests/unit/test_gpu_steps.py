"""scripts/gpu_quant_runs.sh, the GPU sessions' plan: each step's command parses with its bench
module's own arguments, checked here on the CPU (a misspelled flag found on the lent GPU costs a
device call of a scarce budget)."""

import argparse
import importlib
import os
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_quant_runs.sh"


def steps() -> list[str]:
    line = next(text for text in SCRIPT.read_text().splitlines() if text.startswith("steps="))
    return line.split('"')[1].split()


class Parsed(Exception):
    """Raised in place of the bench's run once its arguments have parsed."""


@pytest.mark.parametrize("step", steps())
def test_each_steps_command_parses_with_its_bench_modules_arguments(step, monkeypatch):
    env = {**os.environ, "DRY_RUN": "1", "OUT": "/tmp/gpu-out", "TRITONLLM_COMMIT": "abc1234"}
    printed = subprocess.run(["bash", str(SCRIPT), step], capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    argv = shlex.split(printed.stdout)
    assert argv[:2] == ["python", "-m"], printed.stdout
    module, parsed, real = importlib.import_module(argv[2]), {}, argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        parsed["args"] = real(self, args, namespace)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    monkeypatch.setattr("sys.argv", [argv[2], *argv[3:]])
    with pytest.raises(Parsed):
        module.main()
    assert parsed["args"].out == "/tmp/gpu-out"


def test_an_unknown_step_is_refused_with_the_steps_named():
    env = {**os.environ, "OUT": "/tmp/gpu-out", "TRITONLLM_COMMIT": "abc1234"}
    done = subprocess.run(["bash", str(SCRIPT), "nope"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 2 and "1b-profile" in done.stderr
