"""CPU time by role on this host while a benchmark row runs: Triton's server process, each python
stub (by its model), each engine process (by the stub that spawned it), and the host as a whole.
Where the served rows fall behind the in-process engine, this says whether the host's cores were
busy and which process used them (the client processes report their own CPU)."""

from __future__ import annotations

import os
import time
from pathlib import Path

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def proc_stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds: user + system over all its threads) of a live process, or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()  # after "pid (comm) ": state, ppid, ..., utime, stime
    return int(fields[1]), (int(fields[11]) + int(fields[12])) * TICK_S


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def role_of(cmd: list[str]) -> str | None:
    """'tritonserver', 'stub <model>' (a python backend stub, by the model directory of its model.py),
    'engine process' (tritonllm's engine core; named after its stub by `sample`), or None."""
    exe = cmd[0].rsplit("/", 1)[-1] if cmd else ""
    if exe == "tritonserver":
        return "tritonserver"
    if exe == "triton_python_backend_stub":
        model = next((Path(c).parent.parent.name for c in cmd if c.endswith("model.py")), "?")
        return f"stub {model}"
    if any("tritonllm.engine.core_process" in c for c in cmd):
        return "engine process"
    return None


def sample() -> dict[int, tuple[str, float]]:
    """pid -> (role, CPU seconds so far) for every process with a role; an engine process is named
    after the stub that spawned it."""
    seen: dict[int, tuple[str, int, float]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        role = role_of(_cmdline(pid))
        stat = proc_stat(pid) if role else None
        if stat is not None:
            seen[pid] = (role, stat[0], stat[1])
    out = {}
    for pid, (role, parent, cpu) in seen.items():
        if role == "engine process" and parent in seen:
            role = f"engine process of {seen[parent][0][len('stub ') :]}"
        out[pid] = (role, cpu)
    return out


def host_busy_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole host so far, over all cores (/proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return (sum(values) - idle) * TICK_S, sum(values) * TICK_S


class HostCpu:
    """`with HostCpu() as cpu:` around a row; then `cpu.cores()` (role -> cores used on average) and
    `cpu.note()`."""

    def __enter__(self) -> HostCpu:
        self.t0, self.before, self.host0 = time.monotonic(), sample(), host_busy_s()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = max(time.monotonic() - self.t0, 1e-9)
        self.after, self.host1 = sample(), host_busy_s()

    def cores(self) -> dict[str, float]:
        used: dict[str, float] = {}
        for pid, (role, cpu) in self.after.items():
            start = self.before.get(pid, (role, 0.0))[1]  # a process started during the row: all its time
            used[role] = used.get(role, 0.0) + (cpu - start) / self.wall
        return dict(sorted(used.items(), key=lambda kv: -kv[1]))

    def host_cores(self) -> tuple[float, int]:
        """Cores busy on average over the row (every process on the host), and the host's cores."""
        busy = self.host1[0] - self.host0[0]
        return busy / self.wall, os.cpu_count() or 1

    def note(self) -> str:
        busy, n = self.host_cores()
        parts = ", ".join(f"{role} {c:.2f}" for role, c in self.cores().items() if c >= 0.01)
        return f"host CPU {busy:.1f} of {n} cores busy; cores by process: {parts}"
