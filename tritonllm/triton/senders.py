"""The python backend's response sender, made safe to share between threads."""

from __future__ import annotations

import threading


class GuardedSender:
    """A python-backend response sender that is never touched after its final response. Triton
    frees a request's response factory once a response with the FINAL flag is sent; asking it
    `is_cancelled()` afterwards crashed the whole server (SIGSEGV in
    TRITONBACKEND_ResponseFactoryIsCancelled, found by `make soak`). The cancellation watcher and
    the sender threads reach one request concurrently, so a lock orders them."""

    def __init__(self, sender):
        self._sender = sender
        self._lock = threading.Lock()
        self.closed = False

    def send(self, response, final: bool, flags: int) -> None:
        with self._lock:
            if self.closed:
                raise RuntimeError("a response after the final one was dropped")
            try:
                self._sender.send(response, flags=flags)
            finally:
                self.closed = self.closed or final

    def is_cancelled(self) -> bool:
        with self._lock:
            return not self.closed and self._sender.is_cancelled()
