"""``featcache serve``: the HTTP feature server (``featcache.http.app``) on uvicorn.

The config is loaded here first, so a bad file fails before any worker starts; each worker
then builds the app from the same file (``FEATCACHE_SERVE_CONFIG``) and its own
``AsyncFeatureCache``: an L1 per worker, kept coherent by the invalidation stream like any
process's. uvicorn owns the sockets, the workers and the signals: SIGTERM (or SIGINT) stops
accepting, waits up to ``serve.drain_timeout`` for the requests in flight, then each worker
closes its cache (publishing its last stats) and exits.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
from types import FrameType
from typing import Any

from featcache.config import CacheConfig, load_config
from featcache.errors import ConfigError
from featcache.http import ENV_CONFIG

__all__ = ["run_serve"]

log = logging.getLogger("featcache.serve")


def run_serve(config_path: str, *, host: str, port: int, workers: int,
              access_log: bool = False) -> int:
    """Serve until stopped; 0 after a clean stop."""
    try:
        import uvicorn  # noqa: PLC0415 - the server's own dependency, loaded when it runs

        import featcache.http.app  # noqa: F401, PLC0415 - Starlette and orjson are there
    except ImportError as exc:
        raise ConfigError(f"featcache serve needs the server extra ({exc.name} is missing): "
                          "pip install 'featcache[server]'") from None

    config = load_config(config_path)
    os.environ[ENV_CONFIG] = os.path.abspath(config_path)
    log.info("featcache serve on http://%s:%d: %d worker(s), %d view(s)", host, port, workers,
             len(config.views))
    # uvicorn answers SIGTERM by draining, then raises the signal again for the handler it
    # found: that one must take it as the clean stop it is, not as the command killed
    previous = signal.signal(signal.SIGTERM, _drained)
    try:
        _run(uvicorn, config, host, port, workers, access_log)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _drained(signum: int, frame: FrameType | None) -> None:
    log.info("featcache serve stopped (SIGTERM): requests in flight answered")


def _run(uvicorn: Any, config: CacheConfig, host: str, port: int, workers: int,
         access_log: bool) -> None:
    fast = importlib.util.find_spec("uvloop") is not None
    uvicorn.run(
        "featcache.http.app:app_from_environment",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        loop="uvloop" if fast else "asyncio",
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
        timeout_graceful_shutdown=int(config.serve.drain_timeout),
        access_log=access_log,
        server_header=False,
        proxy_headers=False,
        log_config=None,  # featcache's logging (--log-format) applies
    )
