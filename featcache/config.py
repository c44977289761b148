"""Configuration: the dataclasses the cache runs on, and the YAML loader that builds them.

Code that builds its views itself constructs ``CacheConfig``/``FeatureView``/``Feature``
directly; ``load_config`` reads the file format documented in ``docs/configuration.md``
(commented example: ``config/featcache.yaml``). Both paths run the same validation, so a bad
value fails at construction with the path of the bad key and what was expected, never later on
the serving path. Whether a table or column exists is checked at the view's first use, since
loading a config must not need a database.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from featcache.errors import ConfigError, UnknownView
from featcache.types import FeatureType
from featcache.urls import mask_url

__all__ = [
    "DEFAULT_L1_ACCESS_SAMPLE_RATE",
    "CacheConfig",
    "Feature",
    "FeatureView",
    "load_config",
    "parse_duration",
]

EntityType = Literal["int", "str"]

#: Share of L1 hits a ``tinylfu`` L1 records in its frequency sketch (``featcache.l1``);
#: docs/l1-policies.md measures the hit rate it costs.
DEFAULT_L1_ACCESS_SAMPLE_RATE = 0.125

#: the id column of ``FeatureResult.to_arrow()``; no feature may take the name
RESERVED_FEATURE_NAME = "entity_id"
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_SQL_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,127}$")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: object, path: str = "") -> float:
    """Seconds from ``30``, ``2.5``, ``"500ms"``, ``"10m"``, ``"1h"`` or ``"7d"``."""
    if isinstance(value, bool):
        raise ConfigError(f"expected a duration like 30, '500ms', '10m', got {value!r}", path)
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ConfigError(
            f"expected a duration like 30, '500ms', '10m', '1h', '7d', got {value!r}", path
        )
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(f"expected a non-negative duration, got {value!r}", path)
    return seconds


def _check_name(value: str, path: str, what: str, pattern: re.Pattern[str] = _NAME_RE) -> None:
    if not isinstance(value, str) or not pattern.match(value):
        raise ConfigError(
            f"expected {what} (letters, digits and _, not starting with a digit), got {value!r}",
            path,
        )


@dataclass(frozen=True, slots=True)
class Feature:
    """One feature column: its declared type and how long a cached value stays fresh."""

    name: str
    type: FeatureType
    max_age: float
    column: str = ""

    def __init__(
        self, name: str, type: FeatureType | str, max_age: float | str, column: str | None = None
    ) -> None:
        path = f"features.{name}"
        _check_name(name, path, "a feature name")
        if name == RESERVED_FEATURE_NAME:  # it would replace the ids in to_arrow()/to_pandas()
            raise ConfigError(
                f"{name!r} is the id column of FeatureResult.to_arrow() and to_pandas(); give "
                f"the feature another name (its SQL column can stay: column: {name})", path)
        if not isinstance(type, FeatureType):
            try:
                if not isinstance(type, str):
                    raise ValueError(type)
                type = FeatureType.parse(type)
            except ValueError:
                raise ConfigError(
                    f"expected a type among {', '.join(t.value for t in FeatureType)}, "
                    f"got {type!r}",
                    f"{path}.type",
                ) from None
        seconds = parse_duration(max_age, f"{path}.max_age")
        if seconds <= 0:
            raise ConfigError("max_age must be greater than zero", f"{path}.max_age")
        column = column or name
        _check_name(column, f"{path}.column", "a SQL column name", _SQL_IDENT_RE)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "type", type)
        object.__setattr__(self, "max_age", seconds)
        object.__setattr__(self, "column", column)


@dataclass(frozen=True, slots=True)
class FeatureView:
    """The features one SQL table holds for one entity type; the unit cached as a Redis row.

    ``ttl`` is the Redis key TTL; by default the longest ``max_age`` plus ``stale_if_error``,
    so a row outlives its freshness by exactly the window in which it may still be served
    ``STALE``. ``negative_ttl`` bounds how long "SQL has no such entity" is remembered.
    """

    name: str
    table: str
    entity_column: str
    event_timestamp_column: str
    features: tuple[Feature, ...]
    entity_type: EntityType = "int"
    schema: str | None = None
    updated_at_column: str | None = None
    ttl: float = 0.0
    negative_ttl: float = 60.0
    stale_if_error: float = 300.0

    def __post_init__(self) -> None:
        path = f"views.{self.name}"
        _check_name(self.name, path, "a view name")
        _check_name(self.table, f"{path}.table", "a SQL table name", _SQL_IDENT_RE)
        if self.schema is not None:
            _check_name(self.schema, f"{path}.schema", "a SQL schema name", _SQL_IDENT_RE)
        _check_name(self.entity_column, f"{path}.entity.column", "a SQL column", _SQL_IDENT_RE)
        _check_name(
            self.event_timestamp_column, f"{path}.event_timestamp", "a SQL column", _SQL_IDENT_RE
        )
        if self.updated_at_column is not None:
            _check_name(self.updated_at_column, f"{path}.updated_at", "a column", _SQL_IDENT_RE)
        if self.entity_type not in ("int", "str"):
            raise ConfigError(
                f"expected 'int' or 'str', got {self.entity_type!r}", f"{path}.entity.type"
            )
        if not isinstance(self.features, Iterable) or isinstance(self.features, str):
            raise ConfigError(f"expected a list of Feature, got {self.features!r}",
                              f"{path}.features")
        features = tuple(self.features)
        if not features:
            raise ConfigError("a view needs at least one feature", f"{path}.features")
        seen: set[str] = set()
        for feature in features:
            if not isinstance(feature, Feature):
                raise ConfigError(f"expected a Feature, got {feature!r}", f"{path}.features")
            if feature.name in seen:
                raise ConfigError("declared twice", f"{path}.features.{feature.name}")
            seen.add(feature.name)
        object.__setattr__(self, "features", features)
        for key in ("negative_ttl", "stale_if_error", "ttl"):
            object.__setattr__(self, key, parse_duration(getattr(self, key), f"{path}.{key}"))
        floor = max(f.max_age for f in features) + self.stale_if_error
        if self.ttl == 0.0:
            object.__setattr__(self, "ttl", floor)
        elif self.ttl < floor:
            raise ConfigError(
                f"must be at least the longest max_age plus stale_if_error ({floor:g} s), "
                f"or a row would vanish while it may still be served",
                f"{path}.ttl",
            )
        if self.negative_ttl <= 0:
            raise ConfigError("must be greater than zero", f"{path}.negative_ttl")

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Everything a ``FeatureCache`` needs. Secrets belong in the URLs, set from the environment."""

    views: tuple[FeatureView, ...]
    redis_url: str = "redis://127.0.0.1:6379/0"
    offline_url: str = "sqlite:///featcache.db"
    key_prefix: str = "fc"
    redis_socket_timeout: float = 0.5
    redis_connect_timeout: float = 2.0
    redis_max_connections: int = 64
    redis_read_chunk: int = 1000
    sql_chunk_size: int = 1000
    sql_connect_timeout: float = 5.0
    sql_pool_size: int = 5
    max_id_length: int = 512
    fence_ttl: float = 60.0
    stream_maxlen: int = 100_000
    l1_policy: str | None = None  # None: no in-process cache
    l1_max_entries: int = 100_000
    l1_max_ttl: float = 5.0
    l1_access_sample_rate: float = DEFAULT_L1_ACCESS_SAMPLE_RATE
    lease_ttl: float = 2.0
    lease_wait: float = 0.2
    xfetch_beta: float = 1.0  # 0 turns early refresh off
    breaker_failures: int = 5
    breaker_window: float = 10.0
    breaker_open_for: float = 2.0
    sql_concurrency: int = 16
    sql_queue_timeout: float = 1.0
    on_sql_error: str = "raise"  # or "mark": values become None with status UNAVAILABLE
    popularity_sample_rate: float = 0.05  # share of calls counted; 0 turns counting off
    popularity_bucket: float = 60.0
    popularity_buckets: int = 120
    popularity_half_life: float = 3600.0
    popularity_flush_interval: float = 1.0
    #: the ``warmer:`` section as written; validated by the warmer (``featcache.jobs``) when
    #: it starts, since only that process reads it
    warmer: Mapping[str, Any] = field(default_factory=dict, compare=False)
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.views, Iterable) or isinstance(self.views, str):
            raise ConfigError(f"expected a list of FeatureView, got {self.views!r}", "views",
                              self.source)
        views = tuple(self.views)
        if not views:
            raise ConfigError("declare at least one view", "views", self.source)
        names: set[str] = set()
        for view in views:
            if not isinstance(view, FeatureView):
                raise ConfigError(f"expected a FeatureView, got {view!r}", "views", self.source)
            if view.name in names:
                raise ConfigError("declared twice", f"views.{view.name}", self.source)
            names.add(view.name)
        object.__setattr__(self, "views", views)
        if not isinstance(self.key_prefix, str) or not _PREFIX_RE.match(self.key_prefix):
            raise ConfigError(
                f"expected 1-64 characters among letters, digits, '_', '-', '.'; "
                f"got {self.key_prefix!r}",
                "redis.key_prefix",
                self.source,
            )
        for key in ("redis_socket_timeout", "redis_connect_timeout", "sql_connect_timeout",
                    "fence_ttl", "l1_max_ttl", "lease_ttl", "breaker_window",
                    "breaker_open_for", "popularity_bucket", "popularity_half_life",
                    "popularity_flush_interval"):
            value = parse_duration(getattr(self, key), key)
            if value <= 0:
                raise ConfigError("must be greater than zero", key, self.source)
            object.__setattr__(self, key, value)
        for key, low, high in (
            ("redis_max_connections", 1, 10_000),
            ("redis_read_chunk", 1, 100_000),
            ("sql_chunk_size", 1, 30_000),
            ("sql_pool_size", 1, 1_000),
            ("max_id_length", 1, 1_000_000),
            ("stream_maxlen", 100, 100_000_000),
            ("l1_max_entries", 1, 100_000_000),
            ("breaker_failures", 1, 1_000_000),
            ("sql_concurrency", 1, 10_000),
            ("popularity_buckets", 1, 100_000),
        ):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(
                    f"expected an integer from {low} to {high}, got {value!r}", key, self.source
                )
        rate = self.l1_access_sample_rate
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate <= 1:
            raise ConfigError(f"expected a number greater than 0 and at most 1, got {rate!r}",
                              "l1.access_sample_rate", self.source)
        rate = self.popularity_sample_rate
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate <= 1:
            raise ConfigError(f"expected a number from 0 to 1, got {rate!r}",
                              "popularity.sample_rate", self.source)
        for key in ("lease_wait", "sql_queue_timeout", "xfetch_beta"):
            value = parse_duration(getattr(self, key), key)  # >= 0; 0 is allowed
            object.__setattr__(self, key, value)
        if self.l1_policy is not None and self.l1_policy not in _L1_POLICIES:
            raise ConfigError(
                f"expected one of {', '.join(_L1_POLICIES)}, got {self.l1_policy!r}",
                "l1.policy", self.source,
            )
        if self.on_sql_error not in ("raise", "mark"):
            raise ConfigError(
                f"expected 'raise' or 'mark', got {self.on_sql_error!r}",
                "degradation.on_sql_error", self.source,
            )
        for key in ("redis_url", "offline_url"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise ConfigError("expected a URL", key, self.source)

    def __repr__(self) -> str:
        # URLs may carry passwords: a config printed in a log must not show them
        return (
            f"CacheConfig(redis_url={mask_url(self.redis_url)!r}, "
            f"offline_url={mask_url(self.offline_url)!r}, key_prefix={self.key_prefix!r}, "
            f"views=[{', '.join(v.name for v in self.views)}], source={self.source!r})"
        )

    __str__ = __repr__

    @property
    def fill_window(self) -> float:
        """Seconds after its fence (the read before SQL) within which a fill or fenced write
        may still land: half of ``fence_ttl``, so a tombstone it raced with is certainly still
        there; the other half is margin (docs/consistency.md, "The fill deadline")."""
        return self.fence_ttl / 2

    def view(self, name: str) -> FeatureView:
        for view in self.views:
            if view.name == name:
                return view
        raise UnknownView(name, [v.name for v in self.views])

    def with_overrides(self, **changes: Any) -> CacheConfig:
        return replace(self, **changes)


# --------------------------------------------------------------------------- file loading

_SECTIONS: dict[str, dict[str, str]] = {
    # yaml section -> {yaml key: CacheConfig field}
    "redis": {
        "url": "redis_url",
        "key_prefix": "key_prefix",
        "socket_timeout": "redis_socket_timeout",
        "connect_timeout": "redis_connect_timeout",
        "max_connections": "redis_max_connections",
        "read_chunk": "redis_read_chunk",
    },
    "offline_store": {
        "url": "offline_url",
        "chunk_size": "sql_chunk_size",
        "connect_timeout": "sql_connect_timeout",
        "pool_size": "sql_pool_size",
    },
    "limits": {"max_id_length": "max_id_length"},
    "invalidation": {"fence_ttl": "fence_ttl", "stream_maxlen": "stream_maxlen"},
    "l1": {
        "policy": "l1_policy", "max_entries": "l1_max_entries", "max_ttl": "l1_max_ttl",
        "access_sample_rate": "l1_access_sample_rate",
    },
    "stampede": {
        "lease_ttl": "lease_ttl", "lease_wait": "lease_wait", "xfetch_beta": "xfetch_beta",
    },
    "degradation": {
        "breaker_failures": "breaker_failures",
        "breaker_window": "breaker_window",
        "breaker_open_for": "breaker_open_for",
        "sql_concurrency": "sql_concurrency",
        "sql_queue_timeout": "sql_queue_timeout",
        "on_sql_error": "on_sql_error",
    },
    "popularity": {
        "sample_rate": "popularity_sample_rate",
        "bucket": "popularity_bucket",
        "buckets": "popularity_buckets",
        "half_life": "popularity_half_life",
        "flush_interval": "popularity_flush_interval",
    },
}
_L1_POLICIES = ("lru", "lfu", "ttl", "tinylfu")
_FLOAT_FIELDS = {"xfetch_beta", "popularity_sample_rate", "l1_access_sample_rate"}
_DURATION_FIELDS = {
    "fence_ttl", "l1_max_ttl", "lease_ttl", "lease_wait", "breaker_window",
    "breaker_open_for", "sql_queue_timeout", "popularity_bucket", "popularity_half_life",
    "popularity_flush_interval",
}
_VIEW_DEFAULT_KEYS = ("negative_ttl", "stale_if_error")
_VIEW_KEYS = (
    "table", "schema", "entity", "event_timestamp", "updated_at", "ttl",
    "negative_ttl", "stale_if_error", "features",
)
_FEATURE_KEYS = ("type", "max_age", "column")
_ENV_ALIASES = {
    "FEATCACHE_REDIS_URL": ("redis", "url"),
    "FEATCACHE_OFFLINE_URL": ("offline_store", "url"),
    "FEATCACHE_KEY_PREFIX": ("redis", "key_prefix"),
}
_INT_FIELDS = {
    "redis_max_connections", "redis_read_chunk", "sql_chunk_size", "sql_pool_size",
    "max_id_length", "stream_maxlen", "l1_max_entries", "breaker_failures", "sql_concurrency",
    "popularity_buckets",
}


_ENV_ORIGINS: dict[str, str] = {}  # which env var set which path, while one load runs
_ENV_LOCK = threading.Lock()


def _unknown(key: str, known: Iterable[str], path: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; expected one of {', '.join(known)}"
    var = _ENV_ORIGINS.get(path)
    origin = f" (set by environment variable {var})" if var else ""
    return ConfigError(f"unknown key {key!r}{origin}{hint}", path, source)


def _mapping(value: object, path: str, source: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"expected a mapping, got {type(value).__name__}", path, source)
    for key in value:
        if not isinstance(key, str):
            raise ConfigError(f"expected string keys, got {key!r}", path, source)
    return value


def _normalize_shorthand(doc: dict[str, Any]) -> None:
    """Expand ``feature: "float, 10m"`` into a mapping, so env overrides can reach its keys."""
    views = doc.get("views")
    if not isinstance(views, dict):
        return
    for spec in views.values():
        features = spec.get("features") if isinstance(spec, dict) else None
        if not isinstance(features, dict):
            continue
        for name, fspec in features.items():
            features[name] = _expand_shorthand(fspec)


def _expand_shorthand(spec: object) -> object:
    """``"float, 10m"`` -> ``{"type": "float", "max_age": "10m"}``; anything else as it is."""
    if isinstance(spec, str):
        type_text, _, age = spec.partition(",")
        return {"type": type_text.strip(), "max_age": age.strip() or None}
    return spec


def _apply_env(doc: dict[str, Any], env: Mapping[str, str], source: str) -> dict[str, str]:
    """``FEATCACHE_REDIS_URL`` style aliases and ``FEATCACHE__SECTION__KEY`` for any scalar.

    Path segments match the file's keys case-insensitively. Returns which dotted path each
    variable set, so a later "unknown key" error can name the variable instead of the file.
    """
    origins: dict[str, str] = {}
    for var, value in sorted(env.items()):
        if var in _ENV_ALIASES:
            parts: tuple[str, ...] = _ENV_ALIASES[var]
        elif var.startswith("FEATCACHE__"):
            parts = tuple(p for p in var[len("FEATCACHE__"):].split("__"))
        else:
            continue
        node: dict[str, Any] = doc
        resolved: list[str] = []
        for depth, part in enumerate(parts):
            key = next((k for k in node if k.lower() == part.lower()), part.lower())
            resolved.append(key)
            if depth == len(parts) - 1:
                node[key] = value
                break
            child = node.get(key)
            if isinstance(child, str) and len(resolved) >= 2 and resolved[-2] == "features":
                child = node[key] = _expand_shorthand(child)  # "float, 10m" set by a variable
            if child is None and depth == 0 and key in (*_SECTIONS, "defaults", "warmer"):
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(
                    f"environment variable {var} names {'.'.join(resolved)!r}, "
                    "which is not in the configuration",
                    ".".join(resolved),
                    source,
                )
            node = child
        origins[".".join(resolved)] = var
    return origins


def _build_feature(name: str, spec: object, path: str, source: str) -> Feature:
    spec = _mapping(_expand_shorthand(spec), path, source)  # a shorthand may come from the env
    for key in spec:
        if key not in _FEATURE_KEYS:
            raise _unknown(key, _FEATURE_KEYS, f"{path}.{key}", source)
    for key in ("type", "max_age"):
        if spec.get(key) in (None, ""):
            raise ConfigError(f"missing required key {key!r}", f"{path}.{key}", source)
    try:
        return Feature(name, str(spec["type"]), spec["max_age"], spec.get("column"))
    except ConfigError as exc:
        raise ConfigError(exc.message, f"views.{path.split('.')[1]}.{exc.path}", source) from None


def _build_view(name: str, spec: object, defaults: Mapping[str, Any], source: str) -> FeatureView:
    path = f"views.{name}"
    spec = _mapping(spec, path, source)
    for key in spec:
        if key not in _VIEW_KEYS:
            raise _unknown(key, _VIEW_KEYS, f"{path}.{key}", source)
    for key in ("table", "entity", "event_timestamp", "features"):
        if key not in spec:
            raise ConfigError(f"missing required key {key!r}", f"{path}.{key}", source)
    entity = spec["entity"]
    if isinstance(entity, str):
        entity = {"column": entity}
    entity = _mapping(entity, f"{path}.entity", source)
    for key in entity:
        if key not in ("column", "type"):
            raise _unknown(key, ("column", "type"), f"{path}.entity.{key}", source)
    if "column" not in entity:
        raise ConfigError("missing required key 'column'", f"{path}.entity.column", source)
    features_spec = _mapping(spec["features"], f"{path}.features", source)
    features = tuple(
        _build_feature(fname, fspec, f"{path}.features.{fname}", source)
        for fname, fspec in features_spec.items()
    )
    options = {k: spec.get(k, defaults.get(k)) for k in _VIEW_DEFAULT_KEYS}
    try:
        return FeatureView(
            name=name,
            table=spec["table"],
            schema=spec.get("schema"),
            entity_column=entity["column"],
            entity_type=entity.get("type", "int"),
            event_timestamp_column=spec["event_timestamp"],
            updated_at_column=spec.get("updated_at"),
            features=features,
            ttl=spec.get("ttl") or 0.0,
            **{k: v for k, v in options.items() if v is not None},
        )
    except ConfigError as exc:
        raise ConfigError(exc.message, exc.path, source) from None


def config_from_dict(
    doc: Mapping[str, Any], source: str = "<dict>", env: Mapping[str, str] | None = None
) -> CacheConfig:
    """Build a ``CacheConfig`` from the parsed file; ``env`` overrides (default: os.environ)."""
    doc = copy.deepcopy(dict(_mapping(doc, "", source)))  # never write into the caller's dict
    assert isinstance(doc, dict)
    _normalize_shorthand(doc)
    origins = _apply_env(doc, os.environ if env is None else env, source)
    with _ENV_LOCK:
        _ENV_ORIGINS.clear()
        _ENV_ORIGINS.update(origins)
        try:
            return _build_config(doc, source)
        finally:
            _ENV_ORIGINS.clear()


def _build_config(doc: dict[str, Any], source: str) -> CacheConfig:
    known_top = (*_SECTIONS, "defaults", "views", "warmer")
    kwargs: dict[str, Any] = {}
    for key, value in doc.items():
        if key not in known_top:
            raise _unknown(key, known_top, key, source)
        if key == "warmer":
            kwargs["warmer"] = dict(_mapping(value or {}, key, source))
        if key in _SECTIONS:
            section = _mapping(value, key, source)
            for sub, sub_value in section.items():
                target = _SECTIONS[key].get(sub)
                if target is None:
                    raise _unknown(sub, _SECTIONS[key], f"{key}.{sub}", source)
                kwargs[target] = _section_value(target, sub_value, f"{key}.{sub}", source)
    defaults = _mapping(doc.get("defaults") or {}, "defaults", source)
    for key in defaults:
        if key not in _VIEW_DEFAULT_KEYS:
            raise _unknown(key, _VIEW_DEFAULT_KEYS, f"defaults.{key}", source)
    views_spec = _mapping(doc.get("views") or {}, "views", source)
    kwargs["views"] = tuple(
        _build_view(name, spec, defaults, source) for name, spec in views_spec.items()
    )
    try:
        return CacheConfig(source=source, **kwargs)
    except ConfigError as exc:
        raise ConfigError(exc.message, _field_path(exc.path), source) from None
    except TypeError as exc:  # a wrong type slipped past the section readers
        raise ConfigError(str(exc), "", source) from None


def _section_value(target: str, value: Any, path: str, source: str) -> Any:
    """Environment overrides arrive as strings: parse them as the field expects."""
    if target in _INT_FIELDS and isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise ConfigError(f"expected an integer, got {value!r}", path, source) from None
    if target in _FLOAT_FIELDS and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"expected a number, got {value!r}", path, source) from None
    if target.endswith("timeout") or target in _DURATION_FIELDS:
        try:
            return parse_duration(value, path)
        except ConfigError as exc:
            raise ConfigError(exc.message, path, source) from None
    return value


def _field_path(field_name: str) -> str:
    for section, mapping in _SECTIONS.items():
        for key, target in mapping.items():
            if target == field_name:
                return f"{section}.{key}"
    return field_name


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> CacheConfig:
    """Read a YAML config file; environment variables ``FEATCACHE_...`` override it."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the file: {exc.strerror or exc}", "", source) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"the file is not UTF-8 text ({exc.reason} at byte {exc.start})", "",
                          source) from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{where}not valid YAML ({getattr(exc, 'problem', exc)})", "",
                          source) from None
    if doc is None:
        raise ConfigError("the file is empty", "", source)
    return config_from_dict(doc, source, env)
