"""The response pump: the engine loop's sends leave its thread, stay in order per request and
merge while the server is slow to take them; failures reach the engine; close() drains."""

import threading
import time
from types import SimpleNamespace

import pytest

from tritonllm.engine.response_pump import Pending, ResponsePump, merge
from tritonllm.triton.senders import GuardedSender


def seq(uid):
    return SimpleNamespace(uid=uid, output_ids=[], unsent_logprobs_start=0)


class Recorder:
    def __init__(self, delay=0.0, fail_uid=None):
        self.delay, self.fail_uid = delay, fail_uid
        self.sent, self.failed = [], []
        self.lock = threading.Lock()
        self.gate = threading.Event()
        self.gate.set()

    def send(self, s, ids, n_context, final, n_output, logprobs_from):
        self.gate.wait()
        time.sleep(self.delay)
        if s.uid == self.fail_uid:
            raise RuntimeError("client gone")
        with self.lock:
            self.sent.append((s.uid, list(ids), n_context, final))

    def send_error(self, s, exc):
        with self.lock:
            self.sent.append((s.uid, "error", str(exc), True))

    def pump(self, workers=2):
        return ResponsePump(self.send, self.send_error, lambda s, exc: self.failed.append(s.uid), workers)


def test_merge_keeps_the_first_context_and_appends_new_ids():
    a = Pending(seq(1), [10, 11, 12], 2, False)  # context 10, 11; new 12
    b = Pending(seq(1), [11, 12, 13, 14], 2, True)  # context 11, 12; new 13, 14
    m = merge(a, b)
    assert (m.ids, m.n_context, m.final) == ([10, 11, 12, 13, 14], 2, True)


def test_idle_pump_sends_each_response_in_order():
    """Idle (each response delivered before the next is put): one response per put, in order."""
    rec = Recorder()
    pump = rec.pump()
    s = seq(7)
    for i in range(20):
        pump.put(s, [i], 0, i == 19)
        deadline = time.monotonic() + 5
        while len(rec.sent) <= i and time.monotonic() < deadline:
            time.sleep(0.001)
    pump.close()
    assert [x[1] for x in rec.sent] == [[i] for i in range(20)] and rec.sent[-1][3]


def test_busy_sender_merges_a_requests_responses_without_losing_or_reordering_ids():
    rec = Recorder()
    rec.gate.clear()  # the server is not taking responses yet
    pump = rec.pump(workers=2)
    streams = [seq(u) for u in range(6)]
    for step in range(50):
        for s in streams:
            pump.put(s, [step], 0, step == 49)
    rec.gate.set()
    pump.close()
    for s in streams:
        mine = [x for x in rec.sent if x[0] == s.uid]
        assert sum((x[1] for x in mine), []) == list(range(50))
        assert [x[3] for x in mine] == [False] * (len(mine) - 1) + [True]
    assert len(rec.sent) < 6 * 50  # merged while blocked


def test_error_goes_after_the_responses_before_it_and_failures_are_reported():
    rec = Recorder(fail_uid=2)
    pump = rec.pump()
    pump.put(seq(1), [5], 0, False)
    pump.put_error(seq(1), ValueError("bad"))
    pump.put(seq(2), [1], 0, False)
    pump.close()
    assert [x[1] for x in rec.sent if x[0] == 1] == [[5], "error"]
    assert rec.failed == [2]


class FreeingSender:
    """Like a python-backend sender: the final response frees the response factory; touching it
    afterwards is recorded (in Triton 2.51 it crashed the server)."""

    def __init__(self):
        self.freed = False
        self.touched_after_free = 0
        self.sent = 0

    def send(self, response, flags=0):
        if self.freed:
            self.touched_after_free += 1
        self.sent += 1
        if flags:
            self.freed = True
            time.sleep(0.002)  # the round trip to Triton's core goes on after the factory is gone

    def is_cancelled(self):
        if self.freed:
            self.touched_after_free += 1
        return False


def test_guarded_sender_is_never_touched_after_the_final_response():
    raw = FreeingSender()
    sender = GuardedSender(raw)
    stop = threading.Event()

    def watcher():  # the engine's cancellation watcher, polling as fast as it can
        while not stop.is_set():
            sender.is_cancelled()

    threads = [threading.Thread(target=watcher) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(50):
        sender.send(f"r{i}", final=False, flags=0)
    sender.send("last", final=True, flags=1)
    time.sleep(0.01)
    stop.set()
    for t in threads:
        t.join()
    assert raw.sent == 51 and raw.touched_after_free == 0 and sender.closed
    assert not sender.is_cancelled()
    with pytest.raises(RuntimeError, match="after the final"):
        sender.send("late", final=False, flags=0)
    assert raw.sent == 51


def test_first_and_final_responses_go_out_ahead_of_mid_stream_ones():
    """ends-first: while the sender is held, a new stream's first response and a finished stream's
    final one overtake mid-stream responses put before them; each stream keeps its own order."""
    rec = Recorder()
    rec.gate.clear()
    pump = rec.pump(workers=1)
    pump.put(seq(0), [0], 0, False)  # blocks the sender (taken before the gate)
    time.sleep(0.05)
    pump.put(seq(1), [1, 2], 1, False)  # mid-stream (context 1 already sent)
    pump.put(seq(2), [7], 0, False)  # a stream's first response
    pump.put(seq(3), [3, 4], 1, True)  # a final one
    pump.put(seq(4), [5, 6], 1, False)  # mid-stream
    pump.put(seq(4), [6, 8], 1, True)  # ... its final: merged and promoted
    rec.gate.set()
    pump.close()
    order = [x[0] for x in rec.sent]
    assert order == [0, 2, 3, 4, 1]
    assert rec.sent[3] == (4, [5, 6, 8], 1, True)


def test_arrival_order_keeps_the_order_responses_were_first_put():
    rec = Recorder()
    rec.gate.clear()
    pump = ResponsePump(rec.send, rec.send_error, lambda s, exc: None, workers=1, ends_first=False)
    pump.put(seq(0), [0], 0, False)
    time.sleep(0.05)
    pump.put(seq(1), [1, 2], 1, False)
    pump.put(seq(2), [7], 0, False)
    pump.put(seq(3), [3, 4], 1, True)
    pump.put(seq(1), [2, 9], 1, True)  # merged in place: keeps seq 1's turn
    rec.gate.set()
    pump.close()
    assert [x[0] for x in rec.sent] == [0, 1, 2, 3]
    assert rec.sent[1] == (1, [1, 2, 9], 1, True)


def test_an_error_takes_the_mid_stream_response_before_it_along():
    rec = Recorder()
    rec.gate.clear()
    pump = rec.pump(workers=1)
    pump.put(seq(0), [0], 0, False)
    time.sleep(0.05)
    pump.put(seq(5), [1, 2], 1, False)  # mid-stream
    pump.put(seq(6), [3, 4], 1, False)  # mid-stream, another stream
    pump.put_error(seq(5), ValueError("bad"))
    rec.gate.set()
    pump.close()
    assert [(x[0], x[1]) for x in rec.sent] == [(0, [0]), (5, [1, 2]), (5, "error"), (6, [3, 4])]


def test_ends_first_under_load_loses_and_reorders_nothing():
    """Many streams, first/mid/final responses put while the sender is slow: every id arrives once,
    in order, and each stream's last response is its only final one."""
    rec = Recorder(delay=0.0002)
    pump = rec.pump(workers=2)
    streams = [seq(u) for u in range(40)]
    for n in range(30):
        for s in streams:  # the first response has no context, later ones one id of it
            pump.put(s, [n - 1, n] if n else [0], 1 if n else 0, n == 29)
    pump.close()
    for s in streams:
        mine = [x for x in rec.sent if x[0] == s.uid]
        got = mine[0][1] + sum((x[1][x[2] :] for x in mine[1:]), [])
        assert got == list(range(30))
        assert [x[3] for x in mine] == [False] * (len(mine) - 1) + [True]
