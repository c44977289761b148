"""Builders of the command-line tests (``test_cli_conventions``, ``test_offline_urls``): the
installed console script, a port nothing listens on, and a one-view config file."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
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
