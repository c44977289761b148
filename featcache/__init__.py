"""featcache: a batched, honest read-through cache of ML features, Redis in front of SQL.

Everything public is re-exported here; the modules behind it are private to the package.
"""

from featcache.client import FeatureCache, Fence, PendingWrite, PutReport
from featcache.config import CacheConfig, Feature, FeatureView, load_config
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
    OfflineStoreError,
    OfflineStoreUnavailable,
    SchemaError,
    UnknownFeature,
    UnknownView,
)
from featcache.invalidation import InvalidationReport, invalidate
from featcache.result import FeatureResult
from featcache.types import NO_VALUE, FeatureType, Status

__version__ = "0.1.0"

__all__ = [
    "NO_VALUE",
    "AmbiguousFeature",
    "BackendError",
    "CacheConfig",
    "CacheConfigError",
    "CacheUnavailable",
    "ConfigError",
    "EmbeddedServerError",
    "FeatcacheError",
    "Feature",
    "FeatureCache",
    "FeatureResult",
    "FeatureType",
    "FeatureView",
    "Fence",
    "InvalidEntityId",
    "InvalidRequest",
    "InvalidationReport",
    "OfflineStoreError",
    "OfflineStoreUnavailable",
    "PendingWrite",
    "PutReport",
    "SchemaError",
    "Status",
    "UnknownFeature",
    "UnknownView",
    "invalidate",
    "load_config",
]
