"""Start and stop a real Triton server (the binary shipped in the nvidia-pytriton wheel).

The wheel's server expects a backend folder holding the python backend and the stub that matches
the Python running the models. We lay that folder out per server, point LD_LIBRARY_PATH at the
wheel's bundled libraries and at this Python's own libpython (otherwise the stub may load another
system libpython), bind loopback only and give every server its own shared-memory prefix.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .drain import wait_drained

log = logging.getLogger(__name__)


class ServerError(RuntimeError):
    """The server died or never became ready; the message holds the tail of its log."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVER_FLAGS = ["--log-verbose=0", "--exit-timeout-secs=15"]  # beside the repository: deploy/Dockerfile's CMD too
_PROBE = (
    "import importlib.util, json, sys, sysconfig; s = importlib.util.find_spec('pytriton'); "
    "print(json.dumps([list(s.submodule_search_locations)[0] if s and s.submodule_search_locations else None, "
    "'%d.%d' % sys.version_info[:2], sysconfig.get_config_var('LIBDIR')]))"
)


@dataclass(frozen=True)
class ServingPython:
    """The Python whose environment runs the models: the nvidia-pytriton server tree installed in
    it (binary, python backend, a stub per Python version), its version and its libpython folder."""

    executable: str
    root: Path
    version: str
    libdir: str

    @classmethod
    def of(cls, executable: str = sys.executable) -> ServingPython:
        out = subprocess.run([executable, "-c", _PROBE], capture_output=True, text=True, timeout=60)
        if out.returncode:
            raise ServerError(f"{executable} could not be asked about its environment: {out.stderr[-500:]}")
        package, version, libdir = json.loads(out.stdout)
        if package is None:
            raise ServerError(f"nvidia-pytriton is not installed for {executable}: pip install nvidia-pytriton==0.7.0")
        root = Path(package) / "tritonserver"
        if not (root / "bin" / "tritonserver").exists():
            raise ServerError(f"no tritonserver binary under {root}; install nvidia-pytriton")
        return cls(executable, root, version, libdir or str(Path(executable).resolve().parent.parent / "lib"))

    def prepare_backend_dir(self, dest: Path) -> Path:
        """Copy the python backend with the stub for this Python's version into dest/python."""
        stub = self.root / "python_backend_stubs" / self.version / "triton_python_backend_stub"
        if not stub.exists():
            raise ServerError(f"the wheel has no python backend stub for Python {self.version}")
        py = dest / "python"
        py.mkdir(parents=True, exist_ok=True)
        for f in (self.root / "backends" / "python").iterdir():
            if f.is_file():
                shutil.copy2(f, py / f.name)
        shutil.copy2(stub, py / "triton_python_backend_stub")
        return dest

    def environment(self, base: dict[str, str]) -> dict[str, str]:
        """`base` with the wheel's libraries and this Python's libpython first on the library path
        (otherwise the stub may load another libpython) and its bin folder first on PATH."""
        env = dict(base)
        libs = [str(self.root.parent.parent / "nvidia_pytriton.libs"), self.libdir]
        env["LD_LIBRARY_PATH"] = ":".join([*libs, *([env["LD_LIBRARY_PATH"]] if env.get("LD_LIBRARY_PATH") else [])])
        env["PATH"] = f"{Path(self.executable).parent}:{env.get('PATH', '')}"
        return env


@dataclass
class TritonServer:
    """One tritonserver process on loopback; use as a context manager or call start()/stop()."""

    model_repository: Path
    http_port: int = 0
    grpc_port: int = 0
    metrics_port: int = 0
    log_dir: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    startup_timeout_s: float = 240.0
    env: dict[str, str] = field(default_factory=dict)  # extra environment for the server and its stubs
    watchdog: bool = False  # recover a model whose python stub process died (Triton 2.51 does not)
    reload_timeout_s: float = 15.0  # then restart the whole server
    drain_timeout_s: float = 30.0  # stop() first waits up to this long for the engines to finish their requests
    python: str = sys.executable  # whose environment (packages, pytriton server) the models run in
    _proc: subprocess.Popen | None = None
    _workdir: Path | None = None

    def __post_init__(self) -> None:
        self.model_repository = Path(self.model_repository).resolve()
        # a port the OS just handed out and took back can come again: draw until the three differ
        taken = {p for p in (self.http_port, self.grpc_port, self.metrics_port) if p}
        for name in ("http_port", "grpc_port", "metrics_port"):
            while not getattr(self, name):
                port = free_port()
                if port not in taken:
                    setattr(self, name, port)
                    taken.add(port)
        self.shm_prefix = f"tllm{os.getpid()}_{self.grpc_port}_"
        self.serving = ServingPython.of(self.python)

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def log_path(self) -> Path:
        if self.log_dir:
            return Path(self.log_dir) / "tritonserver.log"
        if self._workdir is None:
            raise ServerError("the server was never started: it has no log")
        return self._workdir / "tritonserver.log"

    def command(self) -> list[str]:
        """`tritonserver --model-repository=... SERVER_FLAGS` plus what this harness adds: the wheel's
        backend folder and shared-memory prefix, loopback addresses and ports, the watchdog's mode."""
        return [
            str(self.serving.root / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={self._workdir / 'backends'}",
            "--http-address=127.0.0.1",
            f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.grpc_port}",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={self.metrics_port}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            *(["--model-control-mode=explicit", "--load-model=*"] if self.watchdog else []),
            *SERVER_FLAGS,
            *self.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        env = self.serving.environment(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.update(self.env)
        return env

    def start(self) -> TritonServer:
        self._lifecycle = threading.RLock()  # a restart by the watchdog and stop() never overlap
        self._launch()
        if self.watchdog:
            self._watch_stop = threading.Event()
            self.recoveries: list[tuple[str, str, float]] = []  # (model, "reload" | "restart", seconds)
            threading.Thread(target=self._watch, daemon=True, name="triton-watchdog").start()
        return self

    def _launch(self, append_log: bool = False) -> None:
        if self._workdir is None:  # a restart reuses it (the old stubs may still hold its files)
            self._workdir = Path(tempfile.mkdtemp(prefix="tritonllm-server-"))
        if not (self._workdir / "backends").exists():
            self.serving.prepare_backend_dir(self._workdir / "backends")
        if self.log_dir:
            Path(self.log_dir).mkdir(parents=True, exist_ok=True)
        logf = open(self.log_path, "ab" if append_log else "wb")
        log.info("starting tritonserver grpc=%s http=%s", self.grpc_url, self.http_url)
        self._proc = subprocess.Popen(
            self.command(), stdout=logf, stderr=subprocess.STDOUT, env=self.environment(), start_new_session=True
        )
        logf.close()
        self.wait_ready()

    def stub_pids(self) -> dict[str, set[int]]:
        """Python stub processes by model name (the model's directory is on their command line)."""
        import psutil

        out: dict[str, set[int]] = {}
        models = [d.name for d in self.model_repository.iterdir() if (d / "1" / "model.py").exists()]
        try:
            children = psutil.Process(self._proc.pid).children(recursive=True) if self._proc else []
        except psutil.NoSuchProcess:
            return out
        for p in children:
            try:
                if p.status() == psutil.STATUS_ZOMBIE:  # killed, not yet reaped by the server
                    continue
                cmd = " ".join(p.cmdline())
            except psutil.Error:
                continue
            for m in models:
                if f"/{m}/" in cmd:
                    out.setdefault(m, set()).add(p.pid)
        return out

    def _watch(self) -> None:
        self.watched = self.stub_pids()
        while not self._watch_stop.wait(1.0):
            try:
                if self.is_alive():
                    self._watch_once()
                else:  # Triton 2.51 can abort while it unloads a model whose stub was killed
                    self._restart_exited()
            except Exception:  # the watchdog must outlive any one failed check
                log.exception("watchdog check failed")

    def _restart_exited(self) -> None:
        t0 = time.monotonic()
        with self._lifecycle:
            if self._watch_stop.is_set() or self.is_alive():
                return
            code = self._proc.poll() if self._proc is not None else None
            log.warning("tritonserver exited (code %s): restarting it", code)
            self._terminate(timeout_s=5.0)
            self._launch(append_log=True)
        self.recoveries.append(("tritonserver", "restart", round(time.monotonic() - t0, 2)))
        self.watched = self.stub_pids()

    def _watch_once(self) -> None:
        now = self.stub_pids()
        for model, pids in self.watched.items():
            if not pids & now.get(model, set()):
                self._recover(model, pids)
                break
        self.watched = self.stub_pids()

    def _recover(self, model: str, dead: set[int]) -> None:
        """Reload the model whose stub died. Triton 2.51 may answer the load at once without
        starting a new stub, or never finish it (it waits on the dead stub's in-flight requests):
        unless a new stub runs within `reload_timeout_s`, restart the server on its ports."""
        t0 = time.monotonic()
        log.warning("python stub of %s died (pids %s): reloading the model", model, sorted(dead))
        status = self._request(f"/v2/repository/models/{model}/load", data=b"{}", timeout_s=self.reload_timeout_s)
        while status == 200 and time.monotonic() - t0 < self.reload_timeout_s:
            if self.stub_pids().get(model, set()) - dead:
                self.recoveries.append((model, "reload", round(time.monotonic() - t0, 2)))
                return
            time.sleep(0.2)
        log.warning("reloading %s did not finish in %.0f s: restarting tritonserver", model, self.reload_timeout_s)
        with self._lifecycle:
            if self._watch_stop.is_set():
                return
            self._terminate(timeout_s=5.0)
            self._launch(append_log=True)
        self.recoveries.append((model, "restart", round(time.monotonic() - t0, 2)))

    def is_alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except (OSError, ServerError):
            return "(no log)"

    def _request(self, path: str, data: bytes | None = None, timeout_s: float = 2.0) -> int:
        """HTTP status of a GET (or POST with data) to the server; 0 when it does not answer."""
        req = urllib.request.Request(f"http://{self.http_url}{path}", data=data, method="POST" if data else "GET")
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return 0

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if not self.is_alive():
                code = self._proc.returncode if self._proc else None
                self.stop()
                raise ServerError(f"tritonserver exited with {code} before it was ready:\n{self.log_tail()}")
            if self._request("/v2/health/ready") == 200:
                return
            time.sleep(0.25)
        tail = self.log_tail()
        self.stop()
        raise ServerError(f"tritonserver not ready after {self.startup_timeout_s}s:\n{tail}")

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def drain(self, timeout_s: float) -> None:
        """Wait, at most `timeout_s`, until no engine holds a request (`drain.wait_drained`: why)."""
        held = wait_drained(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout_s, self.is_alive)
        if held:
            log.warning("stopping tritonserver with %d engine requests unfinished after %.0f s", held, timeout_s)

    def stop(self, timeout_s: float = 20.0) -> None:
        """Drain the engines, then SIGTERM the whole process group (server and stubs), SIGKILL after
        timeout, clean shm."""
        if getattr(self, "_watch_stop", None) is not None:
            self._watch_stop.set()
        if self.drain_timeout_s and self.is_alive():
            self.drain(self.drain_timeout_s)
        lock = getattr(self, "_lifecycle", None)
        acquired = lock.acquire(timeout=self.startup_timeout_s) if lock is not None else False
        try:
            self._terminate(timeout_s)
            self._remove_workdir()
        finally:
            if acquired:
                lock.release()

    def _remove_workdir(self) -> None:
        """The backend copy goes with the server; the log stays where `log_dir` puts it (without a
        `log_dir` the log is in the work directory, which is then kept for it)."""
        if self._workdir is None:
            return
        shutil.rmtree(self._workdir / "backends", ignore_errors=True)
        if self.log_dir:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def _terminate(self, timeout_s: float) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not stop in %ss; killing its process group", timeout_s)
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        for f in glob.glob(f"/dev/shm/{self.shm_prefix}*"):
            with contextlib.suppress(OSError):
                os.unlink(f)

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
