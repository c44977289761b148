"""Background processes built on the library: the warmer and the ETL invalidation hook.

Installed as ``featcache.jobs`` (``pyproject.toml`` maps this directory), so no top-level
``jobs`` package lands in site-packages where it could clash with another project's.
"""
