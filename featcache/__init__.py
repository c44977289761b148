"""featcache: a batched, honest read-through cache of ML features, Redis in front of SQL.

Everything public is re-exported here; the modules behind it are private to the package. The
re-exports are resolved on first use (PEP 562), so ``import featcache`` itself loads nothing
heavy, and a tool that needs only the errors or the config (``featcache --help``, the ETL hook)
never loads the read path, redis-py or SQLAlchemy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from featcache.async_client import AsyncFeatureCache, AsyncModelCache
    from featcache.client import FeatureCache, Fence, PendingWrite, PutReport
    from featcache.config import (
        CacheConfig,
        ChangeQuery,
        DegradationConfig,
        Feature,
        FeatureView,
        FollowChangesConfig,
        InvalidationConfig,
        L1Config,
        LimitsConfig,
        OfflineStoreConfig,
        PopularityConfig,
        RedisConfig,
        ScheduleConfig,
        StampedeConfig,
        WarmerConfig,
        load_config,
    )
    from featcache.errors import (
        AmbiguousFeature,
        BackendError,
        CacheConfigError,
        CacheUnavailable,
        ConfigError,
        EmbeddedServerError,
        FeatcacheError,
        InvalidEntityId,
        InvalidRequest,
        ModelOutputError,
        OfflineStoreError,
        OfflineStoreUnavailable,
        PartlyUnavailable,
        SchemaError,
        UnknownFeature,
        UnknownView,
    )
    from featcache.invalidation import InvalidationReport, invalidate
    from featcache.models import ModelCache, ModelPolicy, ModelResult
    from featcache.result import FeatureResult
    from featcache.types import NO_VALUE, FeatureType, Status

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("AsyncFeatureCache", "AsyncModelCache"), "async_client"),
    **dict.fromkeys(("FeatureCache", "Fence", "PendingWrite", "PutReport"), "client"),
    **dict.fromkeys((
        "CacheConfig", "ChangeQuery", "DegradationConfig", "Feature", "FeatureView",
        "FollowChangesConfig", "InvalidationConfig", "L1Config", "LimitsConfig",
        "OfflineStoreConfig", "PopularityConfig", "RedisConfig", "ScheduleConfig",
        "StampedeConfig", "WarmerConfig", "load_config",
    ), "config"),
    **dict.fromkeys((
        "AmbiguousFeature", "BackendError", "CacheConfigError", "CacheUnavailable",
        "ConfigError", "EmbeddedServerError", "FeatcacheError", "InvalidEntityId",
        "InvalidRequest", "ModelOutputError", "OfflineStoreError", "OfflineStoreUnavailable",
        "PartlyUnavailable",
        "SchemaError", "UnknownFeature", "UnknownView",
    ), "errors"),
    **dict.fromkeys(("InvalidationReport", "invalidate"), "invalidation"),
    **dict.fromkeys(("ModelCache", "ModelPolicy", "ModelResult"), "models"),
    "FeatureResult": "result",
    **dict.fromkeys(("NO_VALUE", "FeatureType", "Status"), "types"),
}

__all__ = [
    "NO_VALUE",
    "AmbiguousFeature",
    "AsyncFeatureCache",
    "AsyncModelCache",
    "BackendError",
    "CacheConfig",
    "CacheConfigError",
    "CacheUnavailable",
    "ChangeQuery",
    "ConfigError",
    "DegradationConfig",
    "EmbeddedServerError",
    "FeatcacheError",
    "Feature",
    "FeatureCache",
    "FeatureResult",
    "FeatureType",
    "FeatureView",
    "Fence",
    "FollowChangesConfig",
    "InvalidEntityId",
    "InvalidRequest",
    "InvalidationConfig",
    "InvalidationReport",
    "L1Config",
    "LimitsConfig",
    "ModelCache",
    "ModelOutputError",
    "ModelPolicy",
    "ModelResult",
    "OfflineStoreConfig",
    "OfflineStoreError",
    "OfflineStoreUnavailable",
    "PartlyUnavailable",
    "PendingWrite",
    "PopularityConfig",
    "PutReport",
    "RedisConfig",
    "ScheduleConfig",
    "SchemaError",
    "StampedeConfig",
    "Status",
    "UnknownFeature",
    "UnknownView",
    "WarmerConfig",
    "invalidate",
    "load_config",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'featcache' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"featcache.{module}"), name)
    globals()[name] = value  # resolved once: later lookups are plain module attributes
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
