"""The benchmark's CPU-by-process sampler: roles from command lines, CPU read from /proc."""

import os
import time

from bench.host_cpu import HostCpu, proc_stat, role_of


def test_roles_from_command_lines():
    assert role_of(["/opt/tritonserver/bin/tritonserver", "--model-repository=/r"]) == "tritonserver"
    stub = ["/x/backends/python/triton_python_backend_stub", "/r/llm_engine/1/model.py", "shm", "1"]
    assert role_of(stub) == "stub llm_engine"
    core = ["python3", "-c", "from tritonllm.engine.core_process import main; main()", "7"]
    assert role_of(core) == "engine process"
    assert role_of(["python3", "-m", "pytest"]) is None and role_of([]) is None


def test_cpu_seconds_of_a_process_grow_with_its_work():
    before = proc_stat(os.getpid())[1]
    end = time.process_time() + 0.2
    while time.process_time() < end:
        pass
    assert proc_stat(os.getpid())[1] - before >= 0.1


def test_host_note_counts_busy_cores():
    with HostCpu() as cpu:
        end = time.process_time() + 0.2
        while time.process_time() < end:
            pass
    busy, n = cpu.host_cores()
    assert 0.3 <= busy <= n + 0.5  # this loop kept one core busy
    assert cpu.note().startswith(f"host CPU {busy:.1f} of {n} cores busy")
