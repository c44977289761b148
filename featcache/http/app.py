"""The ASGI application of ``featcache serve``: routes, the bearer token, request limits, the
errors a client reads, and one ``AsyncFeatureCache`` per worker process for its lifespan.

Routes (docs/serving.md)::

    POST /get-online-features   Feast's feature-server request and response (``shapes``)
    POST /v1/features           featcache's own: columnar JSON, or Arrow IPC by ``Accept``
    POST /v1/invalidate         the ETL hook: {"view": V, "ids": [...]} (no ids: the view)
    GET  /healthz               the process answers (no I/O)
    GET  /readyz                Redis and SQL answer (503 naming the one that does not)
    GET  /metrics               Prometheus: this worker's ``featcache_*`` families

When ``FEATCACHE_SERVE_TOKEN`` is set, every route but ``/healthz`` and ``/readyz`` (probes
carry no secrets) wants ``Authorization: Bearer <token>`` (401 without it). Errors are JSON,
``{"error": message, "type": featcache's exception class}``, never a traceback: 400 for a body
that is not JSON or a request featcache refuses (unknown view or feature, a bad id), 413 past
``serve.max_body`` bytes or ``serve.max_ids`` ids, 503 when SQL could not answer every value
(the body then holds what could be served, each value with its status: the server's cache
marks values ``UNAVAILABLE`` instead of raising) or when Redis is down for an invalidation,
500 for anything else (logged with its traceback here, on the server).
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, replace
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from featcache.async_client import AsyncFeatureCache
from featcache.config import CacheConfig, load_config
from featcache.errors import (
    CacheUnavailable,
    FeatcacheError,
    InvalidRequest,
    OfflineStoreError,
    OfflineStoreUnavailable,
)
from featcache.http import ENV_CONFIG, ENV_TOKEN
from featcache.http.shapes import (
    ARROW_STREAM,
    WRITE_TIMES,
    feast_response,
    features_response,
    parse_feast_request,
    parse_features_request,
    parse_invalidate_request,
)
from featcache.metrics import CacheCollector, new_registry
from featcache.result import FeatureResult
from featcache.types import Status

__all__ = ["TooLarge", "app_from_environment", "create_app"]

log = logging.getLogger("featcache.serve")

_JSON = "application/json"

Handler = Callable[[Request], Awaitable[Response]]


class TooLarge(InvalidRequest):
    """A request over ``serve.max_body`` bytes or ``serve.max_ids`` ids (413)."""


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body, option=WRITE_TIMES), status, media_type=_JSON)


def _error(status: int, exc: BaseException | str, kind: str | None = None) -> Response:
    message = exc if isinstance(exc, str) else str(exc)
    return _json({"error": message, "type": kind or type(exc).__name__}, status)


class Server:
    """What the routes share: the cache, the config, the token and the metrics registry."""

    def __init__(self, config: CacheConfig, token: str | None) -> None:
        # values SQL cannot answer are marked UNAVAILABLE, not raised: the response then
        # carries every value that could be served, with a 503
        self.config = config.replace(
            degradation=replace(config.degradation, on_sql_error="mark"))
        self.token = token.encode() if token else None
        self.limits = config.serve
        self.cache: AsyncFeatureCache | None = None
        self.registry: Any = None

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.cache = AsyncFeatureCache(self.config)
        self.registry = new_registry(CacheCollector(self.cache.sync))
        log.info("serving %d view(s), prefix %s, pid %d", len(self.config.views),
                 self.config.redis.key_prefix, os.getpid())
        try:
            yield
        finally:
            await self.cache.aclose()

    # ------------------------------------------------------------------ request plumbing

    def _authorized(self, request: Request) -> bool:
        if self.token is None:
            return True
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(),
                                                                  self.token)

    async def _body(self, request: Request) -> Any:
        limit = self.limits.max_body
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise TooLarge(f"the body is {int(length):,} bytes; at most {limit:,} "
                           "(serve.max_body)")
        chunks = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise TooLarge(f"the body is over {limit:,} bytes (serve.max_body)")
            chunks.append(chunk)
        # a Feast client posts its JSON without a content type: any body is read as JSON
        try:
            return orjson.loads(b"".join(chunks))
        except orjson.JSONDecodeError as exc:
            raise InvalidRequest(f"the body is not JSON: {exc}") from None

    def _count(self, ids: list[Any]) -> None:
        if len(ids) > self.limits.max_ids:
            raise TooLarge(f"{len(ids):,} ids; at most {self.limits.max_ids:,} per request "
                           "(serve.max_ids)")

    def guarded(self, handler: Handler, *, protected: bool = True) -> Handler:
        """``handler`` behind the token, with featcache's errors turned into responses."""

        async def run(request: Request) -> Response:
            if protected and not self._authorized(request):
                response = _error(401, "a bearer token is required (Authorization: Bearer "
                                  "<token>)", "Unauthorized")
                response.headers["WWW-Authenticate"] = "Bearer"
                return response
            try:
                return await handler(request)
            except TooLarge as exc:
                return _error(413, exc)
            except InvalidRequest as exc:
                return _error(400, exc)
            except (CacheUnavailable, OfflineStoreError) as exc:
                # an invalidation without Redis, a table gone: the client may retry later
                log.warning("%s %s: %s", request.method, request.url.path, exc)
                status = 503 if isinstance(exc, CacheUnavailable | OfflineStoreUnavailable) else 500
                return _error(status, exc)
            except FeatcacheError as exc:
                log.error("%s %s: %s", request.method, request.url.path, exc)
                return _error(500, exc)
            except Exception:
                log.exception("%s %s failed", request.method, request.url.path)
                return _error(500, "internal error (logged by the server)", "InternalError")

        return run

    # ------------------------------------------------------------------ routes

    @property
    def _cache(self) -> AsyncFeatureCache:
        assert self.cache is not None, "the lifespan builds the cache before any request"
        return self.cache

    async def feast(self, request: Request) -> Response:
        parsed = parse_feast_request(await self._body(request), self.config)
        self._count(parsed.ids)
        result = await self._cache.get_features(parsed.ids, parsed.features)
        return _json(feast_response(result, parsed), _status_of(result))

    async def features(self, request: Request) -> Response:
        parsed = parse_features_request(await self._body(request))
        self._count(parsed.ids)
        result = await self._cache.get_features(parsed.ids, parsed.features)
        if ARROW_STREAM in request.headers.get("accept", ""):
            return Response(_arrow_stream(result), _status_of(result), media_type=ARROW_STREAM)
        return _json(features_response(result), _status_of(result))

    async def invalidate(self, request: Request) -> Response:
        parsed = parse_invalidate_request(await self._body(request))
        if parsed.ids is not None:
            self._count(parsed.ids)
        report = await self._cache.invalidate(parsed.view, parsed.ids)
        return _json(asdict(report))

    async def healthz(self, request: Request) -> Response:
        return _json({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        checks: dict[str, str] = {}
        cache = self._cache
        try:
            await cache.ping()
            checks["redis"] = "ok"
        except FeatcacheError as exc:
            checks["redis"] = str(exc)
        try:
            await cache.ping_sql()
            checks["sql"] = "ok"
        except FeatcacheError as exc:
            checks["sql"] = str(exc)
        ready = all(v == "ok" for v in checks.values())
        return _json({"ready": ready, **checks}, 200 if ready else 503)

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


def _status_of(result: FeatureResult) -> int:
    """503 when SQL could not answer some value (it is ``UNAVAILABLE`` in the body)."""
    return 503 if Status.UNAVAILABLE in result.status_counts() else 200


def _arrow_stream(result: FeatureResult) -> bytes:
    import pyarrow as pa  # noqa: PLC0415 - only for clients that ask for Arrow

    table = result.to_arrow(with_status=True)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue())


def create_app(config: CacheConfig, *, token: str | None = None) -> Starlette:
    """The application for ``config``; ``token``: the bearer token clients must present
    (None: no authentication). The cache is built when the app starts (its lifespan)."""
    server = Server(config, token)
    guarded = server.guarded
    routes = [
        Route("/get-online-features", guarded(server.feast), methods=["POST"]),
        Route("/v1/features", guarded(server.features), methods=["POST"]),
        Route("/v1/invalidate", guarded(server.invalidate), methods=["POST"]),
        Route("/healthz", guarded(server.healthz, protected=False), methods=["GET"]),
        Route("/readyz", guarded(server.readyz, protected=False), methods=["GET"]),
        Route("/metrics", guarded(server.metrics), methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=server.lifespan)


def app_from_environment() -> Starlette:
    """The app of a worker ``featcache serve`` started: the config file named by
    ``FEATCACHE_SERVE_CONFIG`` (its ``FEATCACHE_*`` overrides apply) and the token in
    ``FEATCACHE_SERVE_TOKEN``."""
    path = os.environ.get(ENV_CONFIG)
    if not path:
        raise InvalidRequest(f"{ENV_CONFIG} is not set: start the server with featcache serve")
    return create_app(load_config(path), token=os.environ.get(ENV_TOKEN) or None)
