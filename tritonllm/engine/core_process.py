"""The engine loop in a process of its own (vLLM's "engine core"), Triton-free.

Under Triton the engine loop shares one interpreter, and so one GIL, with everything the python
backend does: execute() reading requests, the threads sending responses, cancellation polls. At
hundreds of streams the loop then waits for the GIL between launching steps and the device idles.
With `engine_process` the model instance keeps only that I/O side: it validates each request into a
`Sequence` and hands it to `EngineCoreClient`, which sends it to a child process running the runtime
and `EngineLoop`. The child sends back each pass's responses as one message (ids, counts, new
log-probabilities, finished records); a receiver thread here passes them to the requests' sinks.

    parent -> child: ("submit", Sequence) | ("cancel", uid) | ("stop",)
    child -> parent: ("ready", shape, description, slots, pid) | ("failed", message)
                     | ("events", [event, ...], EngineSnapshot | None) | ("bye",)

Shared (`io_processes` > 1): several model instances of one engine on one device are its I/O
sides. The first to start (a file lock orders them) spawns the child, which also listens on a Unix
socket in a folder only this user can open; the others connect there and speak the same messages.
Each sequence's records go back to the side that sent it; counters only to the spawner (so the
engine-wide metrics are not counted once per side). A joined side's "stop" only takes it away (its
sequences are cancelled); the spawner's stops the engine, and every side then gets "bye".

The child's standard output and error are the server's, so its log lines land in Triton's log. It
runs `main()` by import (not `-m`), so what it pickles names this module, not `__main__`."""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import hashlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import NamedTuple, Protocol

from ..config import EngineConfig
from ..errors import RequestValidationError, ServerBusyError
from .loop import watch_cancellations
from .sequence import Sequence
from .stats import EngineSnapshot, EngineStats, Finished

log = logging.getLogger(__name__)
SNAPSHOT_EVERY_S = 0.25  # how often the child sends its counters (metrics poll every 0.5 s)


class CountedSink(Protocol):
    """A request's sink on the I/O side: responses arrive with the counts the engine process made."""

    def send_counted(self, seq, ids: list[int], n_context: int, final: bool, n_output: int, logprobs_from: int): ...
    def send_error(self, seq, error: Exception) -> None: ...
    def is_cancelled(self) -> bool: ...


class Response(NamedTuple):
    """One response of one sequence, as the child's loop made it. A loop pass makes one for every
    live stream (a thousand a step at a thousand streams), all on the loop's thread: the child
    queues and sends each as a plain tuple in these fields' order, read back here with
    `_as_response`, which costs that thread a fraction of what a dataclass built, pickled and read
    back one by one does."""

    uid: int
    ids: list[int]
    n_context: int
    final: bool
    n_output: int
    logprobs_from: int
    logprobs: list[float] | None  # the sequence's log-probabilities from logprobs_from on (where asked for)
    top_logprobs: list | None
    finish_reason: str | None
    reused_tokens: int


_as_response = functools.partial(tuple.__new__, Response)  # (values in field order) -> Response, no Python call


@dataclass(frozen=True)
class Failure:
    uid: int
    error: Exception  # ours as raised (they pickle); any other as a RuntimeError with its message


@dataclass(frozen=True)
class Done:
    finished: Finished  # a sequence ended (sent before its final response, as the loop does)


def _failure(uid: int, exc: Exception) -> Failure:
    if isinstance(exc, (RequestValidationError, ServerBusyError)):
        return Failure(uid, exc)
    return Failure(uid, RuntimeError(f"{type(exc).__name__}: {exc}"))


# -- the child ---------------------------------------------------------------------------------
class _Outbox:
    """The child's side of every sequence's sink: responses are batched per loop pass."""

    def __init__(self, conn: Connection):
        self.conn, self.events, self.lock = conn, [], threading.Lock()
        self.source = None  # the EngineLoop, for snapshots
        self.last_snapshot = 0.0

    def send(self, seq: Sequence, ids, n_context, final):
        n, p = len(seq.output_ids), seq.params
        lp_from = seq.unsent_logprobs_start if p.logprobs else 0  # read on the other side only with logprobs
        lps = seq.logprobs[lp_from:n] if p.logprobs else None
        top = seq.top_logprobs[lp_from:n] if p.logprobs and p.top_logprobs else None
        reason = seq.finish_reason if final else None
        # a plain tuple in Response's field order: made and pickled without a Python call each
        self.events.append((seq.uid, ids, n_context, final, n, lp_from, lps, top, reason, seq.reused_tokens))

    def send_error(self, seq: Sequence, error: Exception) -> None:
        self.events.append(_failure(seq.uid, error))

    def is_cancelled(self) -> bool:
        return False  # the I/O side polls Triton and sends ("cancel", uid)

    def finished(self, done: Finished) -> None:
        self.events.append(Done(done))

    def flush(self) -> None:
        now = time.monotonic()
        snap = None
        if now - self.last_snapshot >= SNAPSHOT_EVERY_S and self.source is not None:
            snap, self.last_snapshot = self.source.snapshot(), now
        if not self.events and snap is None:
            return
        events, self.events = self.events, []
        self.post(("events", events, snap))

    def post(self, message) -> None:
        with self.lock:
            try:
                self.conn.send(message)
            except OSError:  # the I/O side is gone; the reader sees it too and stops the loop
                log.warning("the engine process lost its I/O side; %s not delivered", message[0])


class _Hub:
    """The child's I/O sides: the spawner's connection and those that joined through its socket.
    Each sequence's finished record goes to the side that sent the sequence."""

    def __init__(self):
        self.outboxes: list[_Outbox] = []
        self.routes: dict[int, _Outbox] = {}  # uid -> the side that sent it, until it finishes
        self.lock = threading.Lock()

    def attach(self, conn: Connection) -> _Outbox:
        box = _Outbox(conn)
        with self.lock:
            self.outboxes.append(box)
        return box

    def detach(self, box: _Outbox) -> None:
        with self.lock:
            self.outboxes.remove(box)

    def flush(self) -> None:
        for box in list(self.outboxes):
            box.flush()

    def finished(self, done: Finished) -> None:
        box = self.routes.pop(done.uid, None)
        if box is not None:
            box.finished(done)

    def post_all(self, message) -> None:
        for box in list(self.outboxes):
            box.post(message)


def _serve(conn: Connection) -> None:
    from ..runtimes import load_runtime
    from ..text import TokenizerFiles
    from .heap import freeze_heap
    from .loop import EngineLoop

    cfg, engine_dir, tokenizer_dir, device, address = conn.recv()
    sys.setswitchinterval(cfg.switch_interval_ms / 1000.0)
    hub = _Hub()
    owner = hub.attach(conn)
    try:
        runtime = load_runtime(cfg, Path(engine_dir), device)
        decode = TokenizerFiles(Path(tokenizer_dir)).decode if tokenizer_dir else None
    except Exception as exc:
        log.exception("the engine process could not load its runtime")
        owner.post(("failed", f"{type(exc).__name__}: {exc}"))
        return
    loop = EngineLoop(runtime, cfg, decode=decode, after_step=hub.flush)
    loop.on_finish = hub.finished
    owner.source = loop
    freeze_heap()  # this process holds its engine until it exits
    loop.start()
    ready = ("ready", runtime.shape, runtime.describe(), loop.scheduler.slots, os.getpid())
    listener = _listen(address, loop, hub, ready) if address else None
    owner.post(ready)
    _read_commands(conn, loop, owner, hub, {})
    if listener is not None:
        listener.close()
    loop.stop()
    hub.flush()
    hub.post_all(("bye",))


def _listen(address: str, loop, hub: _Hub, ready: tuple) -> Listener:
    """Accept the I/O sides that join (in a thread): each gets `ready` and a reader of its own."""
    listener = Listener(address, family="AF_UNIX")

    def accept() -> None:
        while True:
            try:
                conn = listener.accept()
            except OSError:  # closed: the engine is stopping
                return
            box = hub.attach(conn)
            box.post(ready)
            threading.Thread(target=_serve_joined, args=(conn, loop, box, hub), daemon=True).start()

    threading.Thread(target=accept, name="tritonllm-core-accept", daemon=True).start()
    return listener


def _serve_joined(conn: Connection, loop, box: _Outbox, hub: _Hub) -> None:
    """A joined side's commands until it leaves; then its unfinished sequences are cancelled (no one
    is left to answer them) and, where it asked to leave, it is told "bye"."""
    seqs: dict[int, Sequence] = {}
    asked = _read_commands(conn, loop, box, hub, seqs)
    for seq in seqs.values():
        if seq.finish_reason is None:
            loop.cancel(seq)
    hub.detach(box)
    if asked:
        box.post(("bye",))


def _read_commands(conn: Connection, loop, outbox: _Outbox, hub: _Hub, seqs: dict[int, Sequence]) -> bool:
    """Serve one side's commands; True when it sent "stop", False when it went away."""
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the I/O side is gone: nothing to answer to
            return False
        if msg[0] == "stop":
            return True
        if msg[0] == "cancel":
            seq = seqs.get(msg[1])
            if seq is not None:
                loop.cancel(seq)
            continue
        seq = msg[1]
        seq.sink = outbox
        seqs[seq.uid] = seq
        hub.routes[seq.uid] = outbox
        try:
            loop.submit(seq)
        except Exception as exc:  # a full queue: this request's error, sent now
            seqs.pop(seq.uid, None)
            hub.routes.pop(seq.uid, None)
            outbox.post(("events", [_failure(seq.uid, exc)], None))
        # ended sequences are dropped lazily: the dict only serves cancellations
        if len(seqs) > 4 * loop.scheduler.slots:
            for uid in [u for u, s in seqs.items() if s.finish_reason is not None]:
                del seqs[uid]


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s tritonllm-engine-core %(levelname)s %(message)s")
    _serve(Connection(int(sys.argv[1])))


# -- the I/O side --------------------------------------------------------------------------------
def child_python() -> str:
    """The Python to run the engine process: $TRITONLLM_PYTHON, else this one. Inside Triton's
    python stub `sys.executable` is the stub, not a Python: then the first python3 on PATH."""
    chosen = os.environ.get("TRITONLLM_PYTHON")
    if chosen:
        return chosen
    if Path(sys.executable).name.startswith("python"):
        return sys.executable
    found = shutil.which("python3") or shutil.which("python")
    if found is None:
        raise RuntimeError("engine_process needs a Python executable: set TRITONLLM_PYTHON or put python3 on PATH")
    return found


def socket_path(key: str) -> Path:
    """Where the engine process shared under `key` listens: a folder only this user can open."""
    folder = Path(tempfile.gettempdir()) / f"tritonllm-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    st = folder.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise RuntimeError(f"{folder} is not this user's private folder: remove it, or set TMPDIR to another place")
    return folder / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.sock"


class EngineCoreClient:
    """Runs the engine loop in a child process, or with `share` joins the one another model instance
    started under the same key; offers the loop's surface to the Triton adapter (submit,
    wait_for_capacity, snapshot, shape, describe, stop)."""

    def __init__(
        self,
        cfg: EngineConfig,
        engine_dir: Path,
        tokenizer_dir: Path | None,
        device: str = "cuda",
        share: str | None = None,
    ):
        self.cfg = cfg
        self.on_finish = None  # callback(Finished) for metrics
        self._live: dict[int, Sequence] = {}
        self._capacity = threading.Condition()
        self._send_lock = threading.Lock()
        self._dead: str | None = None
        self._proc: subprocess.Popen | None = None  # None: joined another instance's engine process
        start = (cfg, str(engine_dir), str(tokenizer_dir) if tokenizer_dir else "", device)
        if share is None:
            self._spawn(start, "")
            ready = self._wait_ready()
        else:
            ready = self._join_or_spawn(start, socket_path(share))
        self.shape, self._description, slots, self._pid = ready
        self._snapshot = EngineSnapshot(EngineStats(), 0, 0, slots)
        self._stop = threading.Event()
        self._receiver = threading.Thread(target=self._receive, name="tritonllm-core-receiver", daemon=True)
        self._watcher = threading.Thread(
            target=watch_cancellations,
            args=(self._stop, lambda: list(self._live.values()), self._cancel),
            name="tritonllm-cancel-watch",
            daemon=True,
        )

    @property
    def owner(self) -> bool:
        """Whether this side started the engine process (and stops it)."""
        return self._proc is not None

    def _spawn(self, start: tuple, address: str) -> None:
        ours, theirs = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._proc = subprocess.Popen(
            [child_python(), "-c", "from tritonllm.engine.core_process import main; main()", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            env=env,
        )
        theirs.close()
        self._conn = Connection(ours.detach())
        self._conn.send((*start, address))

    def _join_or_spawn(self, start: tuple, path: Path) -> tuple:
        """Join the engine process listening at `path`, or start it there. Instances come through
        here one at a time (a file lock), so the first one's process is ready before the others look."""
        with open(f"{path}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._conn = Client(str(path), family="AF_UNIX")
            except (FileNotFoundError, ConnectionRefusedError):
                path.unlink(missing_ok=True)  # a socket left by a server that died
                self._spawn(start, str(path))
            return self._wait_ready()

    def _wait_ready(self):
        try:
            msg = self._conn.recv()
        except (EOFError, OSError):
            msg = ("failed", f"it exited with code {self._proc.wait()}" if self._proc else "it closed the connection")
        if msg[0] != "ready":
            if self._proc is not None:
                self._proc.kill()
            raise RuntimeError(f"the engine process did not start: {msg[1]} (see the log above)")
        return msg[1:]

    def start(self) -> EngineCoreClient:
        self._receiver.start()
        self._watcher.start()
        return self

    def describe(self) -> dict:
        return {**self._description, "engine_process": self._pid, "engine_process_owner": self.owner}

    def snapshot(self) -> EngineSnapshot:
        return self._snapshot

    def submit(self, seq: Sequence) -> None:
        """Hand a validated sequence to the engine process; its responses come to `seq.sink` (a
        CountedSink), a full queue comes back as its error response."""
        if self._dead is not None:
            raise RuntimeError(f"the engine process {self._dead}; restart the model")
        with self._capacity:
            self._live[seq.uid] = seq
        self._post(("submit", dataclasses.replace(seq, sink=None)))

    def wait_for_capacity(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self._capacity:
            while len(self._live) >= self._snapshot.slots:
                left = deadline - time.monotonic()
                if left <= 0 or self._dead is not None:
                    return False
                self._capacity.wait(left)
        return True

    def _post(self, message) -> None:
        with self._send_lock:
            self._conn.send(message)

    def _cancel(self, seq: Sequence) -> None:
        seq.cancel_requested = True
        try:
            self._post(("cancel", seq.uid))
        except OSError:
            log.debug("cancel for sequence %d not sent: the engine process is gone", seq.uid)

    def _receive(self) -> None:
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                break
            except Exception:  # a message that does not unpickle: stop serving rather than lose requests silently
                log.exception("the engine process sent a message that could not be read; stopping it")
                self._proc.kill()
                break
            if msg[0] == "bye":
                break
            _, events, snap = msg
            if snap is not None:
                self._snapshot = snap
            for event in events:
                self._deliver(_as_response(event) if type(event) is tuple else event)
        self._dead = f"exited (code {self._proc.wait()})" if self._proc is not None else "closed its connection"
        self._fail_all(RuntimeError(f"the engine process {self._dead} before this request finished"))

    def _deliver(self, event) -> None:
        if isinstance(event, Done):
            if self.on_finish is not None:
                self.on_finish(event.finished)
            return
        seq = self._live.get(event.uid)
        if seq is None:
            return
        if isinstance(event, Failure):
            self._forget(seq)
            seq.sink.send_error(seq, event.error)
            return
        if event.logprobs is not None:
            seq.logprobs[event.logprobs_from :] = event.logprobs
        if event.top_logprobs is not None:
            seq.top_logprobs[event.logprobs_from :] = event.top_logprobs
        seq.reused_tokens = event.reused_tokens
        if event.final:
            seq.finish_reason = event.finish_reason
            self._forget(seq)
        seq.sink.send_counted(seq, event.ids, event.n_context, event.final, event.n_output, event.logprobs_from)

    def _forget(self, seq: Sequence) -> None:
        with self._capacity:
            self._live.pop(seq.uid, None)
            self._capacity.notify_all()

    def _fail_all(self, exc: Exception) -> None:
        for seq in list(self._live.values()):
            self._forget(seq)
            try:
                seq.sink.send_error(seq, exc)
            except Exception:
                log.warning("could not send the error for sequence %d", seq.uid, exc_info=True)

    def stop(self, timeout_s: float = 30.0) -> None:
        """The owner stops the engine process; a joined side only leaves it."""
        self._stop.set()
        try:
            self._post(("stop",))
        except OSError:
            pass  # already gone
        if self._receiver.is_alive():
            self._receiver.join(timeout_s)
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._conn.close()
        self._fail_all(RuntimeError("the engine is shutting down"))
