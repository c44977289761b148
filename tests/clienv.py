"""Builders of the command-line tests (``test_cli_conventions``, ``test_offline_urls``...): the
installed console script (also on a pseudo-terminal), a port nothing listens on, and a
one-view config file."""

from __future__ import annotations

import os
import pty
import select
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml


def featcache(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed ``featcache`` console script (the one next to this interpreter)."""
    script = shutil.which("featcache", path=os.path.dirname(sys.executable))
    assert script is not None, f"no featcache console script next to {sys.executable}"
    return subprocess.run([script, *args], capture_output=True, text=True, input=stdin,
                          timeout=120, check=False)


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released): a server that is down."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def write_config(path: Path, redis_url: str, key_prefix: str, offline_url: str,
                 table: str = "cv", schema: str | None = None) -> Path:
    """View ``cv`` (int ids; ``ctr`` float 10m, ``clicks`` int 1h) on ``table``, every read
    counted for popularity (so ``top_k`` sees each one)."""
    view: dict[str, object] = {
        "table": table, "entity": {"column": "entity_id", "type": "int"},
        "event_timestamp": "event_ts", "features": {"ctr": "float, 10m", "clicks": "int, 1h"},
    }
    if schema:
        view["schema"] = schema
    path.write_text(yaml.safe_dump({
        "redis": {"url": redis_url, "key_prefix": key_prefix},
        "offline_store": {"url": offline_url, "connect_timeout": "2s"},
        "popularity": {"sample_rate": 1},
        "views": {"cv": view},
    }))
    return path


def featcache_on_a_terminal(*args: str, answer: str | None = None,
                            timeout: float = 120.0) -> tuple[int, str]:
    """Run the console script with a pseudo-terminal as its stdin, stdout and stderr (what a
    person at a shell gives it: progress bars, questions); ``answer`` is typed once a
    ``[y/N]`` question shows. Returns the exit status and everything it wrote."""
    script = shutil.which("featcache", path=os.path.dirname(sys.executable))
    assert script is not None, f"no featcache console script next to {sys.executable}"
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "160", "LINES": "40"}
    leader, follower = pty.openpty()
    proc = subprocess.Popen([script, *args], stdin=follower, stdout=follower, stderr=follower,
                            env=env, close_fds=True)
    os.close(follower)
    output = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.2)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the process closed the terminal
                break
            if not chunk:
                break
            output += chunk
            if answer is not None and b"[y/N]" in output:
                os.write(leader, answer.encode() + b"\n")
                answer = None
        else:
            proc.kill()
        status = proc.wait(timeout=30)
    finally:
        os.close(leader)
    return status, output.decode(errors="replace")
