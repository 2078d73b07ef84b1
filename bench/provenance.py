"""Where a result came from, recorded in every results file: the command, the UTC date, the
machine, and the commit with whether the tree had uncommitted changes. Results are named
`{date}-{machine}-{topic}` (machine: the GPU model, e.g. h200, or cpu)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = "build/results"  # a run never rewrites tracked files; copy a run into results/ deliberately


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def command() -> str:
    """How this process was started, as `python -m module args` where it was run as a module."""
    script = Path(sys.argv[0]).resolve()
    if not script.is_file():  # python -c
        return " ".join(["python", *sys.argv])
    try:
        module = ".".join(script.relative_to(ROOT).with_suffix("").parts)
        return " ".join(["python", "-m", module, *sys.argv[1:]])
    except ValueError:
        return " ".join(sys.argv)


def machine_kind() -> str:
    """The GPU model in lower case ("h200") where torch sees CUDA, else "cpu"."""
    try:
        import torch

        if torch.cuda.is_available():
            words = torch.cuda.get_device_name().replace("NVIDIA", "").split()
            return (words[0] if words else "gpu").lower()
    except ImportError:
        pass
    return "cpu"


def commit() -> tuple[str, bool | None]:
    """(the commit measured, whether tracked files differed from it). TRITONLLM_COMMIT /
    TRITONLLM_DIRTY, where set, win: a copy of the tree sent to another host (the lent GPU) may
    carry a .git of some other commit, or none."""
    if os.environ.get("TRITONLLM_COMMIT"):
        dirty = os.environ.get("TRITONLLM_DIRTY")
        return os.environ["TRITONLLM_COMMIT"], None if dirty is None else dirty == "1"
    head = _git("rev-parse", "HEAD")
    if head:
        return head, bool(_git("status", "--porcelain", "--untracked-files=no"))
    return "unknown", None


def run_facts(**extra) -> dict:
    head, dirty = commit()
    return {
        "command": command(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.node(),
        "machine_kind": machine_kind(),
        "cpus": os.cpu_count(),
        "commit": head,
        "dirty": dirty,
        **extra,
    }


def result_stem(topic: str, facts: dict | None = None) -> str:
    facts = facts or {}
    date = facts.get("date", datetime.datetime.now(datetime.timezone.utc).isoformat())[:10]
    return f"{date}-{facts.get('machine_kind') or machine_kind()}-{topic}"


def write_json(out_dir, topic: str, payload: dict) -> Path:
    """`payload` (which carries run_facts) as out_dir/{date}-{machine}-{topic}.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{result_stem(topic, payload)}.json"
    path.write_text(json.dumps(payload, indent=1))
    return path
