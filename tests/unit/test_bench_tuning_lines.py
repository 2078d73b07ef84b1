"""`bench.triton_runs.keep_tuning_lines`: a Triton server's engine logs its start-up product choices
(through the engine core process's log format); the bench keeps those lines beside its results,
since the next server overwrites the log."""

from bench.triton_runs import keep_tuning_lines

LOG = """I1207 02:24:20.5 server.cc:674] model bench_engine READY
2026-12-07 02:25:01,123 tritonllm-engine-core INFO gemv down+act x1: activation kernel + (4, 1024, 4) ({'a': 1.0})
2026-12-07 02:25:02,456 tritonllm-engine-core INFO quantized product lm_head x256: (128, 128, 64, 8, 3, 1) ({'b': 2.0})
2026-12-07 02:25:02,999 tritonllm-engine-core INFO kernel tables stored in /x/y.json (quant lm_head done)
2026-12-07 02:25:03,000 tritonllm-engine-core INFO decode graphs captured
"""


def test_only_the_tuning_lines_are_kept(tmp_path):
    server_log = tmp_path / "tritonserver.log"
    server_log.write_text(LOG)
    dst = tmp_path / "out" / "topic-server-fp8-tuning.log"
    keep_tuning_lines(server_log, dst)
    kept = dst.read_text().splitlines()
    assert [line.split(" INFO ")[1].split(" ")[0] for line in kept] == ["gemv", "quantized", "kernel"]


def test_no_log_no_file(tmp_path):
    keep_tuning_lines(tmp_path / "missing.log", tmp_path / "dst.log")
    (tmp_path / "empty.log").write_text("I1207 nothing to keep\n")
    keep_tuning_lines(tmp_path / "empty.log", tmp_path / "dst.log")
    assert not (tmp_path / "dst.log").exists()
