"""featcache's HTTP feature server (``featcache serve``): Feast's ``/get-online-features``,
featcache's own ``/v1`` API, health, readiness and metrics, on Starlette and uvicorn.

``shapes`` turns requests into ``get_features`` arguments and results into response bodies
(pure); ``app`` is the ASGI application (routes, the bearer token, limits, errors, the
lifespan of one ``AsyncFeatureCache`` per worker). Imported only by ``featcache serve`` and by
applications that mount the app: the serving library never loads Starlette.
"""

__all__ = ["ENV_CONFIG", "ENV_TOKEN"]

#: the bearer token every client must present, when set
ENV_TOKEN = "FEATCACHE_SERVE_TOKEN"  # noqa: S105 - the variable's name, not a secret
#: the config file a worker loads (``featcache serve`` sets it for the workers it starts)
ENV_CONFIG = "FEATCACHE_SERVE_CONFIG"
