"""The console scripts as a new user runs them: `tritonllm-build` logs its three steps in order,
prints nothing else, exits 0, and writes the repository; a second build reuses the export."""

import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def test_tritonllm_build_logs_three_steps_and_exits_cleanly(tiny_dir, tiny_engine_dir, tmp_path):
    cmd = [
        str(BIN / "tritonllm-build"),
        "--model",
        str(tiny_dir),
        "--name",
        "cli",
        "--out",
        str(tmp_path / "repo"),
        "--onnx-dir",
        str(tiny_engine_dir),
        "--max-context",
        "256",
        "--max-tokens-limit",
        "128",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout == "", f"stray output: {r.stdout!r}"
    steps = [line.split("] ")[0].rsplit("[", 1)[1] for line in r.stderr.splitlines() if "] " in line and " [" in line]
    assert steps == ["1/3", "2/3", "3/3"], r.stderr[-2000:]
    for model in ("cli", "cli_tokenizer", "cli_engine", "cli_detokenizer"):
        assert (tmp_path / "repo" / model / "config.pbtxt").exists()
    assert (tmp_path / "repo" / "cli_engine" / "requirements.txt").read_text().count("onnxruntime==") == 1
