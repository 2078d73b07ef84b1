"""EngineMetrics against a stand-in for the python backend's metric API whose calls block like
Triton's round trips: finished requests are published off the reporting thread, none lost."""

import threading

from tritonllm.engine.stats import EngineSnapshot, EngineStats, Finished
from tritonllm.triton.metrics import EngineMetrics


class SlowMetric:
    def __init__(self, log, name, labels, gate):
        self.log, self.name, self.labels, self.gate = log, name, labels, gate

    def _call(self, kind, value):
        if not self.gate.wait(2.0):  # Triton's core answers when it can (here: once the test opens the gate)
            raise AssertionError(f"{self.name}: a metric call waited on the thread that reported the finish")
        self.log.append((self.name, self.labels.get("reason"), kind, value))

    def increment(self, n):
        self._call("increment", n)

    def observe(self, v):
        self._call("observe", v)

    def set(self, v):
        self._call("set", v)


class FakePb:
    def __init__(self):
        self.log, self.gate = [], threading.Event()
        pb = self

        class MetricFamily:
            COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

            def __init__(self, name, description, kind):
                self.name = name

            def Metric(self, labels, **kw):
                return SlowMetric(pb.log, self.name, labels, pb.gate)

        self.MetricFamily = MetricFamily


class Engine:
    def snapshot(self):
        return EngineSnapshot(EngineStats(), 0, 0, 4)


def test_finished_requests_are_published_off_the_reporting_thread():
    pb = FakePb()
    m = EngineMetrics(pb, Engine(), "m_engine", engine_wide=False)
    reporter = threading.Thread(
        daemon=True,
        target=lambda: [
            m.observe_finished(Finished("length" if i % 3 else "stop", 0.01 * i, 0.002, i)) for i in range(300)
        ],
    )
    reporter.start()
    reporter.join(1.0)
    assert not reporter.is_alive(), "reporting finishes waited for the metric calls (still blocked)"
    assert pb.log == []
    pb.gate.set()
    m.close()  # publishes what is queued
    counts = [(r, v) for n, r, k, v in pb.log if n == "tritonllm_requests_finished_total"]
    assert sum(v for r, v in counts if r == "length") == 200 and sum(v for r, v in counts if r == "stop") == 100
    assert len(counts) < 300  # each reason's count in one call per batch, not one per request
    ttfts = [v for n, r, k, v in pb.log if n == "tritonllm_time_to_first_token_seconds"]
    assert sorted(ttfts) == sorted(0.01 * i for i in range(300))
    assert len([1 for n, *_ in pb.log if n == "tritonllm_inter_token_latency_seconds"]) == 300


def test_a_request_without_tokens_is_counted_without_latencies():
    pb = FakePb()
    pb.gate.set()
    m = EngineMetrics(pb, Engine(), "m_engine", engine_wide=False)
    m.observe_finished(Finished("cancelled", None, None, 1))
    m.close()
    assert [(n, r, k, v) for n, r, k, v in pb.log] == [
        ("tritonllm_requests_finished_total", "cancelled", "increment", 1)
    ]
