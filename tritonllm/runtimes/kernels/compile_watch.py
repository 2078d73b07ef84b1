"""Kernel variants first met after start-up. OpenAI Triton compiles a kernel once per
specialization (its constexprs, and whether integer and pointer arguments are divisible by 16) on
first use: under load that is a stall of hundreds of milliseconds on the engine loop's thread. The
torch-cuda runtime compiles every variant it knows of at start-up, then arms this watch: a later
compile is logged with its specialization (the variant start-up missed) and counted."""

from __future__ import annotations

import contextlib
import logging
import threading

log = logging.getLogger(__name__)


class CompileWatch:
    def __init__(self):
        self.count = 0  # kernel variants compiled (or loaded from Triton's disk cache) while armed
        self._armed, self._starting = False, 0
        self._previous = None  # a hook someone else had installed: still called
        self._lock = threading.Lock()

    def arm(self) -> None:
        """Watch from now on (idempotent; no-op without OpenAI Triton's runtime hooks)."""
        try:
            from triton import knobs
        except ImportError:  # an older Triton: nothing to watch with
            return
        with self._lock:
            if not self._armed:
                self._previous = knobs.runtime.jit_cache_hook
                knobs.runtime.jit_cache_hook = self.hook
                self._armed = True

    @contextlib.contextmanager
    def starting(self):
        """A runtime starting up in this process: its compiles are expected, not counted."""
        with self._lock:
            self._starting += 1
        try:
            yield
        finally:
            with self._lock:
                self._starting -= 1

    def hook(self, **event):
        """OpenAI Triton's `jit_cache_hook` (keywords: key, repr, fn, compile, is_manual_warmup,
        already_compiled), called before it compiles (or loads from its disk cache) a new variant."""
        if not self._starting and not event["is_manual_warmup"]:
            self.count += 1
            spec = event["compile"]
            log.warning(
                "OpenAI Triton compiles a kernel variant after start-up (a stall; add it to the warm-up): %s; "
                "signature %s; constants %s; specialization %s",
                event["repr"],
                spec.get("signature"),
                spec.get("constants"),
                spec.get("configs"),
            )
        return self._previous(**event) if self._previous is not None else None


WATCH = CompileWatch()  # one per process: Triton's hook is process-wide
