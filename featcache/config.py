"""Configuration: the dataclasses the cache runs on, and the YAML loader that builds them.

``CacheConfig`` holds the views (``FeatureView``, ``Feature``) and one small frozen dataclass
per section of the file (``featcache.config_sections``; the warmer's in
``featcache.config_warmer``), each given to the part that runs on it. Code that builds its
views itself constructs them directly; ``load_config`` reads the file format documented in
``docs/configuration.md`` (commented example: ``config/featcache.yaml``). Both paths run the
same validation, once, in the dataclasses, so a bad value fails at construction with the path
of the bad key and what was expected, never later on the serving path. Whether a table or
column exists is checked at the view's first use, since loading a config must not need a
database.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import Field, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, cast

import yaml

from featcache.config_sections import (
    DEFAULT_L1_ACCESS_SAMPLE_RATE,
    KIND,
    SECTIONS,
    DegradationConfig,
    InvalidationConfig,
    L1Config,
    LimitsConfig,
    OfflineStoreConfig,
    PopularityConfig,
    RedisConfig,
    Seconds,
    Section,
    ServeConfig,
    StampedeConfig,
    StatsConfig,
    parse_duration,
)
from featcache.config_warmer import (
    ChangeQuery,
    FollowChangesConfig,
    ScheduleConfig,
    WarmerConfig,
    check_followed_view,
)
from featcache.errors import ConfigError, UnknownView
from featcache.types import FeatureType
from featcache.urls import mask_url

__all__ = [
    "DEFAULT_L1_ACCESS_SAMPLE_RATE",
    "CacheConfig",
    "ChangeQuery",
    "DegradationConfig",
    "Feature",
    "FeatureView",
    "FollowChangesConfig",
    "InvalidationConfig",
    "L1Config",
    "LimitsConfig",
    "OfflineStoreConfig",
    "PopularityConfig",
    "RedisConfig",
    "ScheduleConfig",
    "ServeConfig",
    "StampedeConfig",
    "StatsConfig",
    "WarmerConfig",
    "config_from_dict",
    "find_view",
    "load_config",
    "parse_duration",
]

EntityType = Literal["int", "str"]

#: the id column of ``FeatureResult.to_arrow()``; no feature may take the name
RESERVED_FEATURE_NAME = "entity_id"
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_SQL_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,127}$")


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


def _seconds(default: float) -> Any:
    """A view's duration field: a number or text when built, float seconds once checked
    (``__post_init__``); annotated ``Seconds`` for type checkers."""
    return field(default=default)


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
    ttl: Seconds = _seconds(0.0)
    negative_ttl: Seconds = _seconds(60.0)
    stale_if_error: Seconds = _seconds(300.0)

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
    """Everything a ``FeatureCache`` needs: the views, and one section per concern, each with
    its defaults (``RedisConfig``, ``OfflineStoreConfig``...). Secrets belong in the URLs, set
    from the environment."""

    views: tuple[FeatureView, ...]
    redis: RedisConfig = field(default_factory=RedisConfig)
    offline_store: OfflineStoreConfig = field(default_factory=OfflineStoreConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    invalidation: InvalidationConfig = field(default_factory=InvalidationConfig)
    l1: L1Config = field(default_factory=L1Config)
    stampede: StampedeConfig = field(default_factory=StampedeConfig)
    degradation: DegradationConfig = field(default_factory=DegradationConfig)
    popularity: PopularityConfig = field(default_factory=PopularityConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
    #: read only by the HTTP server (``featcache serve``)
    serve: ServeConfig = field(default_factory=ServeConfig)
    #: read only by the warmer (``featcache.jobs.warmer``); validated with the rest
    warmer: WarmerConfig = field(default_factory=WarmerConfig)
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
        kinds: tuple[type[Section], ...] = (*SECTIONS, WarmerConfig)
        for kind in kinds:
            section = getattr(self, kind.NAME)
            if not isinstance(section, kind):
                raise ConfigError(f"expected a {kind.__name__}, got {section!r}", kind.NAME,
                                  self.source)
        try:
            self.warmer.check_views(view.name for view in views)
        except ConfigError as exc:
            raise ConfigError(exc.message, exc.path, self.source) from None
        if (self.invalidation.replicas or self.redis.read_from_replicas) and (
                self.invalidation.replica_timeout >= self.redis.socket_timeout):
            raise ConfigError(
                f"must be shorter than redis.socket_timeout ({self.redis.socket_timeout:g} s): "
                f"the wait it bounds happens on a connection that times out after that",
                "invalidation.replica_timeout", self.source)

    def __repr__(self) -> str:
        # URLs may carry passwords: a config printed in a log must not show them
        return (
            f"CacheConfig(redis.url={mask_url(self.redis.url)!r}, "
            f"offline_store.url={mask_url(self.offline_store.url)!r}, "
            f"redis.key_prefix={self.redis.key_prefix!r}, "
            f"views=[{', '.join(v.name for v in self.views)}], source={self.source!r})"
        )

    __str__ = __repr__

    def view(self, name: str) -> FeatureView:
        return find_view(self.views, name)

    def replace(self, **sections: Any) -> CacheConfig:
        """A validated copy with some fields replaced: sections (``l1=L1Config("tinylfu")``,
        ``redis=dataclasses.replace(config.redis, key_prefix="canary")``), ``views``."""
        return replace(self, **sections)


def find_view(views: Iterable[FeatureView], name: str) -> FeatureView:
    """The view called ``name``; ``UnknownView`` (with the closest names) if there is none."""
    views = tuple(views)
    for view in views:
        if view.name == name:
            return view
    raise UnknownView(name, [v.name for v in views])


# --------------------------------------------------------------------------- file loading

_TOP_KEYS = (*(section.NAME for section in SECTIONS), "defaults", "views", "warmer")
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
_FOLLOW_KEYS = ("interval", "rewrite", "lookback", "start", "views")
_FOLLOW_VIEW_KEYS = ("change_query",)


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
            if child is None and depth == 0 and key in _TOP_KEYS and key != "views":
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
    for key in doc:
        if key not in _TOP_KEYS:
            raise _unknown(key, _TOP_KEYS, key, source)
    kwargs: dict[str, Any] = {
        section.NAME: _build_section(section, doc[section.NAME], source)
        for section in SECTIONS if section.NAME in doc
    }
    defaults = _mapping(doc.get("defaults") or {}, "defaults", source)
    for key in defaults:
        if key not in _VIEW_DEFAULT_KEYS:
            raise _unknown(key, _VIEW_DEFAULT_KEYS, f"defaults.{key}", source)
    views_spec = _mapping(doc.get("views") or {}, "views", source)
    kwargs["views"] = tuple(
        _build_view(name, spec, defaults, source) for name, spec in views_spec.items()
    )
    if "warmer" in doc:
        kwargs["warmer"] = _build_warmer(doc["warmer"], [v.name for v in kwargs["views"]],
                                         source)
    try:
        return CacheConfig(source=source, **kwargs)
    except ConfigError as exc:
        raise ConfigError(exc.message, exc.path, source) from None


def _build_section(kind: type[Section], value: object, source: str) -> Any:
    """One section from its mapping in the file: unknown keys are named with the closest
    known one, an override's text is read as its field expects, and the dataclass checks the
    rest."""
    section = _mapping(value, kind.NAME, source)
    known = {f.name: f for f in fields(kind)}
    kwargs: dict[str, Any] = {}
    for key, raw in section.items():
        path = f"{kind.NAME}.{key}"
        if key not in known:
            raise _unknown(key, known, path, source)
        kwargs[key] = _from_text(known[key], raw, path, source)
    try:
        return cast(Any, kind)(**kwargs)
    except ConfigError as exc:
        raise ConfigError(exc.message, exc.path, source) from None
    except TypeError as exc:  # a wrong type slipped past the section's checks
        raise ConfigError(str(exc), "", source) from None


def _from_text(spec: Field[Any], value: object, path: str, source: str) -> object:
    """Environment overrides arrive as strings: an integer or plain number field reads them
    with ``int()``/``float()`` (durations are read by ``parse_duration`` in the section)."""
    if not isinstance(value, str):
        return value
    kind = spec.metadata.get(KIND)
    if kind == "integer":
        try:
            return int(value.strip())
        except ValueError:
            raise ConfigError(f"expected an integer, got {value!r}", path, source) from None
    if kind == "number":
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"expected a number, got {value!r}", path, source) from None
    if kind == "flag":
        word = value.strip().lower()
        if word in ("true", "yes", "on", "1"):
            return True
        if word in ("false", "no", "off", "0"):
            return False
        raise ConfigError(f"expected true or false, got {value!r}", path, source)
    if kind == "count":  # the warmer's: text that is not an integer is reported as it is
        try:
            return int(value.strip())
        except ValueError:
            return value
    return value


# ------------------------------------------------------------------------ the warmer's section


def _build_warmer(value: object, configured: list[str], source: str) -> WarmerConfig:
    """``warmer:`` (``featcache.config_warmer``), checked in the order the warmer reads it: a
    missing or null mapping is empty, and an unknown key is listed with the known ones."""
    try:
        doc = _warmer_mapping(value, "warmer", [f.name for f in fields(WarmerConfig)])
        kwargs: dict[str, Any] = {}
        schedule = _warmer_mapping(doc.get("schedule"), "warmer.schedule", ("interval", "cron"))
        if "interval" in schedule and schedule["interval"] is None:
            parse_duration(None, "warmer.schedule.interval")  # a null is no duration
        kwargs["schedule"] = ScheduleConfig(**schedule)
        # the views first: a follow_changes view must be one the warmer runs
        probe = WarmerConfig(views=doc.get("views"))
        probe.check_views(configured)
        if probe.views is not None:
            kwargs["views"] = probe.views
        runs = probe.views_among(configured)
        if doc.get("follow_changes") is not None:
            kwargs["follow_changes"] = _build_follow(doc["follow_changes"], runs, source)
        for key, raw in doc.items():
            if key not in ("schedule", "views", "follow_changes"):
                kwargs[key] = _from_text(WarmerConfig.__dataclass_fields__[key], raw,
                                         f"warmer.{key}", source)
        return WarmerConfig(**kwargs)
    except ConfigError as exc:
        raise ConfigError(exc.message, exc.path, source) from None


def _build_follow(value: object, runs: tuple[str, ...], source: str) -> FollowChangesConfig:
    path = "warmer.follow_changes"
    doc = _warmer_mapping(value, path, _FOLLOW_KEYS)
    queries: dict[str, ChangeQuery] = {}
    for name, raw_view in _warmer_mapping(doc.get("views"), f"{path}.views", None).items():
        view_path = f"{path}.views.{name}"
        check_followed_view(name, runs)
        spec = _warmer_mapping(raw_view, view_path, _FOLLOW_VIEW_KEYS)
        if "change_query" in spec:
            queries[name] = ChangeQuery(spec["change_query"], f"{view_path}.change_query",
                                        source)
    options = {key: raw for key, raw in doc.items() if key != "views"}
    return FollowChangesConfig(**options, change_queries=queries)


def _warmer_mapping(value: object, path: str, keys: Iterable[str] | None) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"expected a mapping, got {type(value).__name__}", path)
    if keys is not None:
        known = tuple(keys)
        for key in value:
            if key not in known:
                raise ConfigError(f"unknown key {key!r}; expected one of {', '.join(known)}",
                                  f"{path}.{key}")
    return dict(value)


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
