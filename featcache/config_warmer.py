"""The ``warmer:`` section of the configuration, as the warmer (``featcache.jobs.warmer``) runs it.

Loaded and validated with the rest of the file (``featcache.config``), so a bad value fails at
load with the path of its key, in every process that loads the file. Nothing here imports the
scheduler or SQLAlchemy until a cron expression or a change query has to be checked::

    warmer:
      schedule: {interval: 60s}        # or {cron: "*/5 * * * *"}; default interval 60s
      jitter: 5s                       # random delay added to each run (default 0)
      misfire_grace: 30s               # a run late by more than this is skipped (default 30s)
      k: 10000                         # most read entities considered per view (default 1000)
      horizon: 5m                      # also refresh rows going stale within it (default 60s)
      lease_ttl: 30s                   # the per-view leader lease (default 30s)
      chunk_rows: 10000                # entities per SQL read / Redis write (default 10000)
      views: [v1, v2]                  # default: every view
      follow_changes:                  # optional; views with updated_at or a change query
        interval: 30s
        rewrite: cached                # or all
        lookback: 5m                   # re-read this far behind the watermark (default 5m)
        start: now                     # a first poll: now minus lookback, or all (default now)
        views:                         # optional, per view
          v2:
            change_query: >-           # instead of v2's updated_at (featcache.jobs.changes)
              SELECT user_id AS entity_id, changed_at AS updated_at
              FROM audit_log WHERE changed_at >= :watermark
      metrics_port: 9108               # optional: Prometheus /metrics (--metrics-port wins)
      metrics_addr: 127.0.0.1          # default 127.0.0.1 (--metrics-addr wins)

Durations take ``parse_duration`` forms (``30``, ``"500ms"``, ``"5m"``).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from featcache.config_sections import KIND, Seconds, Section, duration_field, parse_duration
from featcache.errors import ConfigError, SchemaError

if TYPE_CHECKING:
    from featcache.config import FeatureView

__all__ = [
    "CHANGE_COLUMNS",
    "DEFAULT_LOOKBACK_S",
    "WATERMARK_PARAM",
    "ChangeQuery",
    "FollowChangesConfig",
    "Rewrite",
    "ScheduleConfig",
    "Start",
    "WarmerConfig",
    "check_followed_view",
]

Rewrite = Literal["cached", "all"]
Start = Literal["now", "all"]
#: how far behind the watermark every poll looks again (featcache.jobs.changes: the late commit)
DEFAULT_LOOKBACK_S = 300.0
#: the columns a change query returns, and its one bound parameter
CHANGE_COLUMNS = ("entity_id", "updated_at")
WATERMARK_PARAM = "watermark"
_SELECT = re.compile(r"\s*(select|with)\b", re.IGNORECASE)


def _count(default: int | None, low: int = 1, high: int | None = None,
           what: str = "an integer") -> Any:
    """An integer the warmer counts with: ``what`` from ``low`` (to ``high``), as its errors
    say it (an override's text is read with ``int()`` by the loader)."""
    return field(default=default, metadata={KIND: "count", "range": (low, high), "what": what})


def _check_counts(section: Section) -> None:
    for f in section.__dataclass_fields__.values():
        if f.metadata.get(KIND) != "count":
            continue
        value = getattr(section, f.name)
        low, high = f.metadata["range"]
        if f.default is None and value is None:  # optional (metrics_port)
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (
                high is not None and value > high):
            wanted = f"{low}-{high}" if high is not None else f">= {low}"
            raise ConfigError(f"expected {f.metadata['what']} {wanted}, got {value!r}",
                              f"{section.NAME}.{f.name}")


@dataclass(frozen=True, slots=True)
class ChangeQuery:
    """A change query: one ``SELECT`` returning ``entity_id`` and ``updated_at``, with the
    watermark as the bound parameter ``:watermark``. What can be checked without a database is
    checked here (``ConfigError`` at ``path``); ``path`` and ``source`` name where it was
    configured, so a query that fails at first use still points at the key to fix."""

    sql: str
    path: str = "change_query"
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        sql: object = self.sql
        if not isinstance(sql, str) or not sql.strip():
            raise self._bad(f"expected a SELECT statement (a string), got {sql!r}")
        text = sql.strip()
        if text.endswith(";"):  # a habit from SQL consoles; a subquery cannot carry it
            text = text[:-1].rstrip()
        if ";" in text:
            raise self._bad("expected one SELECT statement, found ';' inside the query")
        if not _SELECT.match(text):
            raise self._bad(
                f"expected a single SELECT (or WITH ... SELECT) statement, got {_head(text)!r}")
        # the SQL store's parser, which binds the query later; only a change query needs it
        from featcache.offline.text import bound_parameters  # noqa: PLC0415

        params = bound_parameters(text)
        if WATERMARK_PARAM not in params:
            raise self._bad(
                "the query has no :watermark parameter; select the changes since it, e.g. "
                "... WHERE updated_at >= :watermark")
        if params != {WATERMARK_PARAM}:
            others = ", ".join(f":{p}" for p in sorted(params - {WATERMARK_PARAM}))
            raise self._bad(f"unknown parameters {others}; only :watermark is bound")
        object.__setattr__(self, "sql", text)

    def _bad(self, message: str) -> ConfigError:
        return ConfigError(message, self.path, self.source)

    def error(self, message: str) -> SchemaError:
        """A failure found at first use (its columns), at the query's key."""
        return SchemaError(f"change query: {message}", self.path, self.source)


def _head(text: str) -> str:
    return text.split(None, 1)[0][:20] if text else ""


@dataclass(frozen=True, slots=True)
class ScheduleConfig(Section):
    """``warmer.schedule``: every ``interval`` seconds (60 when neither is given), or on a
    ``cron`` expression (five fields, UTC); not both."""

    NAME: ClassVar[str] = "warmer.schedule"

    interval: float | None = None
    cron: str | None = None

    def __post_init__(self) -> None:
        if self.interval is not None and self.cron is not None:
            raise ConfigError("give interval or cron, not both", self.NAME)
        if self.cron is None:
            seconds = 60.0 if self.interval is None else _positive(self.interval,
                                                                    "warmer.schedule.interval")
            object.__setattr__(self, "interval", seconds)
            return
        path = "warmer.schedule.cron"
        if not isinstance(self.cron, str):
            raise ConfigError(f"bad cron expression: expected a string, got {self.cron!r}",
                              path)
        from apscheduler.triggers.cron import CronTrigger  # noqa: PLC0415 - only a cron needs it

        try:
            CronTrigger.from_crontab(self.cron, timezone=dt.UTC)
        except ValueError as exc:
            raise ConfigError(f"bad cron expression: {self.cron!r}: {exc}", path) from None


def _positive(value: object, path: str) -> float:
    seconds = parse_duration(value, path)
    if seconds <= 0:
        raise ConfigError("must be greater than zero", path)
    return seconds


@dataclass(frozen=True, slots=True)
class FollowChangesConfig(Section):
    """``warmer.follow_changes``: poll each view's changes every ``interval``; ``rewrite`` the
    changed rows that are ``cached`` or ``all``; ``lookback`` and ``start``: see
    ``featcache.jobs.changes``. ``change_queries``: the views polled through a change query
    instead of their ``updated_at`` column (the file's ``views.<view>.change_query``)."""

    NAME: ClassVar[str] = "warmer.follow_changes"

    interval: Seconds = duration_field(30.0)
    rewrite: Rewrite = "cached"
    lookback: Seconds = duration_field(DEFAULT_LOOKBACK_S, zero=True)
    start: Start = "now"
    change_queries: Mapping[str, ChangeQuery] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.rewrite not in ("cached", "all"):
            raise ConfigError(f"expected 'cached' or 'all', got {self.rewrite!r}",
                              "warmer.follow_changes.rewrite")
        if self.start not in ("now", "all"):
            raise ConfigError(f"expected 'now' or 'all', got {self.start!r}",
                              "warmer.follow_changes.start")
        queries: dict[str, ChangeQuery] = {}
        for name, query in self.change_queries.items():
            path = f"warmer.follow_changes.views.{name}.change_query"
            if not isinstance(query, ChangeQuery):
                raise ConfigError(f"expected a ChangeQuery, got {query!r}", path)
            queries[name] = query if query.path == path else replace(query, path=path)
        object.__setattr__(self, "change_queries", queries)
        self._check_fields()

    def followed(self, view: FeatureView) -> bool:
        return view.updated_at_column is not None or view.name in self.change_queries


@dataclass(frozen=True, slots=True)
class WarmerConfig(Section):
    """``warmer``: what the long-running warmer does, per view it runs (``views``; None: every
    view), on its ``schedule``: warm the ``k`` most read entities whose rows are missing or
    expire within ``horizon``, reading ``chunk_rows`` at a time under a leader lease of
    ``lease_ttl``; and, with ``follow_changes``, follow upstream changes."""

    NAME: ClassVar[str] = "warmer"

    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    jitter: Seconds = duration_field(0.0, zero=True)
    misfire_grace: Seconds = duration_field(30.0)
    k: int = _count(1000)
    horizon: Seconds = duration_field(60.0, zero=True)
    lease_ttl: Seconds = duration_field(30.0)
    chunk_rows: int = _count(10_000)
    views: tuple[str, ...] | None = None
    follow_changes: FollowChangesConfig | None = None
    metrics_port: int | None = _count(None, 1, 65535, "a TCP port")
    metrics_addr: str = "127.0.0.1"

    def __post_init__(self) -> None:
        for name, kind in (("schedule", ScheduleConfig), ("follow_changes", FollowChangesConfig)):
            value = getattr(self, name)
            if not isinstance(value, kind) and (value is not None or name == "schedule"):
                raise ConfigError(f"expected a {kind.__name__}, got {value!r}", f"warmer.{name}")
        if self.views is not None:
            if not isinstance(self.views, list | tuple) or not self.views:
                raise ConfigError(
                    f"expected a non-empty list of view names, got {self.views!r}",
                    "warmer.views")
            object.__setattr__(self, "views", tuple(dict.fromkeys(self.views)))
        _check_counts(self)
        if not isinstance(self.metrics_addr, str) or not self.metrics_addr:
            raise ConfigError(f"expected an address to listen on, got {self.metrics_addr!r}",
                              "warmer.metrics_addr")
        self._check_fields()

    def views_among(self, configured: Iterable[str]) -> tuple[str, ...]:
        """The views this warmer runs: its ``views``, or every one of ``configured``."""
        return self.views if self.views is not None else tuple(configured)

    def check_views(self, configured: Iterable[str]) -> None:
        """Every view named here is one of ``configured`` and, under ``follow_changes``, one
        this warmer runs (``ConfigError`` at the name's path)."""
        known = list(configured)
        for name in self.views or ():
            if name not in known:
                raise ConfigError(f"unknown view; configured: {', '.join(known)}",
                                  f"warmer.views.{name}")
        runs = self.views_among(known)
        for name in self.follow_changes.change_queries if self.follow_changes else ():
            check_followed_view(name, runs)


def check_followed_view(name: str, runs: Iterable[str]) -> None:
    """A view under ``follow_changes.views`` must be one the warmer runs."""
    runs = list(runs)
    if name not in runs:
        raise ConfigError(f"not a view this warmer runs; warmer.views: {', '.join(runs)}",
                          f"warmer.follow_changes.views.{name}")
