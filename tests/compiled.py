"""Kernels compiled for a GPU on this CPU: a script run in a fresh process, outside Triton's
interpreter (which the test processes turn on, and which has no PTX), with the repository on its
path; Triton's bundled ptxas compiles for any target there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_uninterpreted(script: str) -> str:
    """`script`'s standard output; fails the test with its error output if it fails."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout
