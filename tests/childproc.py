"""Process checks for the tests of the private servers: whether a process (or a port) is gone,
and a child Python that starts servers, reports them and can be SIGKILLed while it owns them.

A leaked server would hold ports and memory on developer machines and CI runners forever, so
the promise "nothing outlives its owner" is tested with a real SIGKILL of a real owner.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

import featcache.embedded

#: How long a process may take to disappear after it was signalled, directly or via
#: PR_SET_PDEATHSIG. Generous for loaded CI machines; the usual case is milliseconds.
GONE_TIMEOUT_S = 10.0


def process_gone(pid: int, create_time: float) -> bool:
    """True once ``pid`` no longer runs the process we saw.

    A zombie counts as gone: it runs no code any more, and whether it is reaped depends on
    the container's PID 1, not on the code under test (its sockets may close a moment later,
    hence ``eventually``). Comparing the creation time guards against pid reuse.
    """
    try:
        proc = psutil.Process(pid)
        return proc.create_time() != create_time or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def eventually(condition: Callable[[], bool], timeout: float = GONE_TIMEOUT_S) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` passes; for asynchronous deaths.

    Needed even after the process looks dead: the leader of a multi-threaded process (Valkey
    runs I/O threads) shows as a zombie while its other threads are still exiting, and the
    sockets close only when the last thread is gone.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def wait_gone(pid: int, create_time: float) -> bool:
    return eventually(lambda: process_gone(pid, create_time))


def kill_if_running(pid: int, create_time: float) -> None:
    """Last-resort cleanup of a server a failed test left behind (only ones we started)."""
    if not process_gone(pid, create_time):
        os.kill(pid, signal.SIGKILL)


def port_closed(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        return True


def child_env() -> dict[str, str]:
    """Environment for a child Python that imports the same featcache and tests/servers.py."""
    package_root = Path(featcache.embedded.__file__).resolve().parents[1]
    tests_dir = Path(__file__).resolve().parent
    paths = [str(package_root), str(tests_dir)]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def spawn_and_read_line(code: str, timeout: float = 60.0) -> tuple[subprocess.Popen[str], str]:
    """Start ``python -c code`` and return it with the first line it prints.

    The child prints what it started and then sleeps, so that the test can SIGKILL it while
    it owns a server. stderr is inherited so pytest shows the child's traceback on failure.
    """
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=child_env(),
        text=True,
    )
    assert child.stdout is not None
    ready, _, _ = select.select([child.stdout], [], [], timeout)
    line = child.stdout.readline() if ready else ""
    if not line:
        child.kill()
        child.wait(timeout=10)
        pytest.fail(f"child did not report a server within {timeout}s (exit {child.returncode})")
    return child, line


def sigkill_and_reap(child: subprocess.Popen[str]) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)
    if child.stdout is not None:
        child.stdout.close()
