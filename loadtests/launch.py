"""Starting Locust on our locustfile from Python: one process, or a master with workers on
loopback (the load tests and `loadtests.ceiling` both do)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"
OPENAI_LOCUSTFILE = ROOT / "loadtests" / "openai_locustfile.py"


def command(*args: str, locustfile: Path = LOCUSTFILE) -> list[str]:
    return [sys.executable, "-m", "locust", "-f", str(locustfile), *args]


def environment() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT))


def run_distributed(
    master_args: list[str],
    common: list[str],
    workers: int,
    port: int,
    timeout_s: float,
    cwd: Path | None = None,
    master_log: Path | None = None,
) -> tuple[int, str]:
    """A headless master (`master_args` + `common`) on loopback `port` and `workers` workers
    (`common`); waits for the master and stops the workers. Returns the master's exit code and
    its output (or "" where `master_log` receives it)."""
    out = open(master_log, "w") if master_log else subprocess.PIPE
    master = subprocess.Popen(
        command(
            *master_args,
            *f"--master --master-bind-host 127.0.0.1 --master-bind-port {port}".split(),
            "--expect-workers",
            str(workers),
            *common,
        ),
        cwd=cwd,
        env=environment(),
        stdout=out,
        stderr=subprocess.STDOUT,
        text=True,
    )
    time.sleep(2)
    procs = [
        subprocess.Popen(
            command("--worker", *f"--master-host 127.0.0.1 --master-port {port}".split(), *common),
            cwd=cwd,
            env=environment(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(workers)
    ]
    try:
        output, _ = master.communicate(timeout=timeout_s)
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
        if master_log:
            out.close()
    return master.returncode, output or ""
