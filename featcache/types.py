"""Small value types shared by every layer: feature types, statuses and the NO_VALUE sentinel."""

from __future__ import annotations

import enum
from typing import Final

__all__ = ["NO_VALUE", "FeatureType", "NoValue", "Status"]


class NoValue:
    """The type of ``NO_VALUE``: "nothing is cached here", never confused with a cached None."""

    _instance: NoValue | None = None

    def __new__(cls) -> NoValue:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NO_VALUE"

    def __bool__(self) -> bool:
        return False

    def __reduce__(self) -> str:
        return "NO_VALUE"


NO_VALUE: Final = NoValue()


class FeatureType(enum.StrEnum):
    """The declared type of a feature; decides SQL coercion, the codec and the Arrow type."""

    INT = "int"  # 64-bit signed
    FLOAT = "float"  # IEEE 754 double; NaN and +-inf round-trip
    BOOL = "bool"
    STR = "str"
    TIMESTAMP = "timestamp"  # timezone-aware, returned in UTC with microsecond precision
    EMBEDDING = "list[float]"  # a vector of doubles

    @classmethod
    def parse(cls, text: str) -> FeatureType:
        aliases = {
            "int": cls.INT, "int64": cls.INT, "integer": cls.INT,
            "float": cls.FLOAT, "float64": cls.FLOAT, "double": cls.FLOAT,
            "bool": cls.BOOL, "boolean": cls.BOOL,
            "str": cls.STR, "string": cls.STR,
            "timestamp": cls.TIMESTAMP, "datetime": cls.TIMESTAMP,
            "list[float]": cls.EMBEDDING, "embedding": cls.EMBEDDING,
        }
        try:
            return aliases[text.strip().lower()]
        except KeyError:
            raise ValueError(text) from None


class Status(enum.StrEnum):
    """Where a value came from; every value featcache returns carries one."""

    HIT_L1 = "HIT_L1"  # in-process cache, fresh
    HIT_REDIS = "HIT_REDIS"  # Redis, fresh
    FILLED = "FILLED"  # read from SQL during this call
    ABSENT = "ABSENT"  # SQL has no row for this entity (value is None)
    STALE = "STALE"  # older than max_age, served only because SQL failed (stale_if_error)
    UNAVAILABLE = "UNAVAILABLE"  # SQL failed, nothing within stale_if_error; value is None
    # (only with degradation.on_sql_error: mark; the default raises OfflineStoreUnavailable)
    COMPUTED = "COMPUTED"  # a model output computed during this call (``featcache.models``)
