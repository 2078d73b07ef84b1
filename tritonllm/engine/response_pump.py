"""Responses sent from worker threads, merged under backpressure (Triton-free).

A python-backend `response_sender.send()` is a round trip to Triton's core (it releases the GIL
and waits for the core to take the response). Made on the engine loop's thread, that wait is
added to every step. The pump takes responses off the loop: `put()` only records them, worker
threads send. One request always goes through the same worker, so its responses stay in order;
while that worker is busy, later tokens of the same request merge into the one pending response.
Idle, every token goes out as it is made; under load each response carries the tokens made while
the previous one was in transit, so the response rate adapts to what the server can take.

Order ("ends-first", the default): a stream's first response (what its TTFT waits on), its final
one and errors (what a client waits on before its next request) go out ahead of mid-stream ones,
which merge meanwhile. A request never has more than one response pending, so its own responses
keep their order; a mid-stream response pending when its request's error arrives goes with it.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class Pending:
    seq: object
    ids: list[int]
    n_context: int
    final: bool
    n_output: int = 0  # tokens generated when the loop put it (what its counter reports)
    error: Exception | None = None
    logprobs_from: int = 0  # the response carries seq.logprobs[logprobs_from:n_output] (where asked for)


def merge(first: Pending, later: Pending) -> Pending:
    """`later`'s window starts with context the reader already gets from `first`: keep first's
    context, append later's new ids."""
    ids = first.ids + later.ids[later.n_context :]
    return Pending(first.seq, ids, first.n_context, later.final, later.n_output, None, first.logprobs_from)


def _urgent(item: Pending) -> bool:
    """A client waits on it: a stream's first response (nothing sent before it), a final one, an error."""
    return item.final or item.n_context == 0 or item.error is not None


class _Worker:
    def __init__(self, pump: ResponsePump, name: str, ends_first: bool):
        self.pump, self.ends_first = pump, ends_first
        self.cond = threading.Condition()
        # (uid, is_error) -> the one pending response; `urgent` goes out before `later`
        self.urgent: collections.OrderedDict[tuple[int, bool], Pending] = collections.OrderedDict()
        self.later: collections.OrderedDict[tuple[int, bool], Pending] = collections.OrderedDict()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def put(self, item: Pending) -> None:
        key = (item.seq.uid, item.error is not None)
        with self.cond:
            if key in self.urgent:  # merged in place: it keeps its turn
                self.urgent[key] = _joined(self.urgent[key], item)
            else:
                prev = self.later.get(key)
                if prev is not None:
                    item = _joined(prev, item)
                if self.ends_first and _urgent(item):
                    self.later.pop(key, None)
                    if item.error is not None and (mid := self.later.pop((key[0], False), None)) is not None:
                        self.urgent[(key[0], False)] = mid  # what was made before the error goes first
                    self.urgent[key] = item
                else:
                    self.later[key] = item
            self.cond.notify()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.urgent and not self.later and not self.pump.stopping:
                    self.cond.wait()
                queue = self.urgent or self.later
                if not queue:
                    return
                _, item = queue.popitem(last=False)
            self.pump.deliver_one(item)


def _joined(prev: Pending, item: Pending) -> Pending:
    return merge(prev, item) if item.error is None else item


class ResponsePump:
    def __init__(
        self, send: Callable, send_error: Callable, on_failure: Callable, workers: int = 4, ends_first: bool = True
    ):
        """send(seq, ids, n_context, final, n_output, logprobs_from) and send_error(seq, exc) do the real sends;
        on_failure(seq, exc) is told when a send raised (the client went away); `ends_first`: the order above
        (False: responses go in the order they were first put)."""
        self._send, self._send_error, self._on_failure = send, send_error, on_failure
        self.stopping = False
        self.sent = 0
        self._workers = [_Worker(self, f"tritonllm-sender-{i}", ends_first) for i in range(workers)]
        for w in self._workers:
            w.thread.start()

    def _worker(self, seq) -> _Worker:
        return self._workers[seq.uid % len(self._workers)]

    def put(self, seq, ids: list[int], n_context: int, final: bool) -> None:
        self.put_counted(seq, ids, n_context, final, len(seq.output_ids), seq.unsent_logprobs_start)

    def put_counted(self, seq, ids: list[int], n_context: int, final: bool, n_output: int, logprobs_from: int) -> None:
        """`put` with the counts given (made where the sequence lives: the engine process)."""
        self._worker(seq).put(Pending(seq, list(ids), n_context, final, n_output, None, logprobs_from))

    def put_error(self, seq, error: Exception) -> None:
        self._worker(seq).put(Pending(seq, [], 0, True, error=error))

    def deliver_one(self, item: Pending) -> None:
        try:
            if item.error is not None:
                self._send_error(item.seq, item.error)
            else:
                self._send(item.seq, item.ids, item.n_context, item.final, item.n_output, item.logprobs_from)
            self.sent += 1
        except Exception as exc:  # the client went away: the engine is told, the pump goes on
            log.warning("sending a response failed: %s", exc)
            self._on_failure(item.seq, exc)

    def close(self, timeout_s: float = 5.0) -> None:
        """Send what is pending, then stop the workers."""
        self.stopping = True
        for w in self._workers:
            with w.cond:
                w.cond.notify_all()
        for w in self._workers:
            w.thread.join(timeout_s)
