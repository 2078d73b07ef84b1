"""The start-up tuners check their candidates (and so compile them) several at a time on a GPU
(`timing.check_all`); the answers come back in the candidates' order whatever thread ran them."""

import contextlib
import os
import threading
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # as the parity tests: this process's kernels are interpreted

import torch

from tritonllm.runtimes.kernels import timing


def checks(n: int, seen: list):
    def check(i):
        time.sleep(0.01 * (n - i))  # later candidates finish first
        seen.append(threading.current_thread().name)
        return i % 3 != 0

    return [lambda i=i: check(i) for i in range(n)]


def test_on_a_gpu_the_checks_run_on_threads_and_answer_in_order(monkeypatch):
    devices = []
    monkeypatch.setattr(torch.cuda, "device", lambda d: devices.append(d) or contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (80 * 2**30, 80 * 2**30))
    seen, ref = [], torch.zeros(64, 4096)
    assert timing.check_all(checks(10, seen), torch.device("cuda", 1), ref) == [i % 3 != 0 for i in range(10)]
    assert len(seen) == 10 and all(name.startswith("tune") for name in seen)
    assert devices == [torch.device("cuda", 1)] * 10  # each thread on the engine's GPU


def test_threads_stop_at_half_the_free_memory(monkeypatch):
    """A 2,048 x 28,672 output's checks take ~1.9 GB each: with 3 GB free they run one at a time."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (3 * 10**9, 80 * 10**9))
    seen = []
    big = torch.zeros(2048, 28672, dtype=torch.bfloat16)
    assert timing.check_all(checks(4, seen), torch.device("cuda"), big) == [False, True, True, False]
    assert set(seen) == {threading.current_thread().name}


def test_elsewhere_or_with_one_thread_they_run_in_order_on_the_caller(monkeypatch):
    seen, ref = [], torch.zeros(4)
    assert timing.check_all(checks(4, seen), torch.device("cpu"), ref) == [False, True, True, False]
    monkeypatch.setattr(timing, "COMPILE_THREADS", 1)
    assert timing.check_all(checks(4, seen), torch.device("cuda"), ref) == [False, True, True, False]
    assert set(seen) == {threading.current_thread().name}
