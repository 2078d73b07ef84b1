"""The GIL profile's summary: py-spy's raw stacks attributed to the engine's threads by the frames
they pass through (the names as py-spy writes them: qualified function, file and line)."""

from bench.profile_server_gil import summarize

RAW = "\n".join(
    [
        "thread (11): tritonllm-engine;Thread._bootstrap (threading.py:995);EngineLoop._run "
        "(tritonllm/engine/loop.py:161);EngineLoop._launch (tritonllm/engine/loop.py:233) 30",
        "thread (12): Thread-2;Thread._bootstrap (threading.py:995);_serve (tritonllm/engine/core_process.py:200);"
        "_read_commands (tritonllm/engine/core_process.py:250) 10",
        "thread (13): Thread-3;_Worker._run (tritonllm/engine/response_pump.py:55) 5",
        "thread (14): Thread-4;something_else (x.py:1) 5",
    ]
)


def test_stacks_are_attributed_to_the_engine_threads():
    report = summarize(RAW, seconds=1, rate=100)
    assert report["samples"] == 50 and report["gil_held_share_of_wall"] == 0.5
    assert report["by_thread_share_of_wall"] == {
        "engine loop": 0.3,
        "request reader (engine process)": 0.1,
        "response senders": 0.05,
        "other": 0.05,
    }


def test_the_engine_process_of_a_stub_is_its_child_running_the_engine_core():
    import os
    import subprocess
    import sys

    from bench.profile_server_gil import engine_process_of

    code = "import time; time.sleep(30)  # stands for: from tritonllm.engine.core_process import main"
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        assert engine_process_of(os.getpid()) == child.pid
        assert engine_process_of(child.pid) is None  # it spawned nothing
    finally:
        child.kill()
        child.wait()
