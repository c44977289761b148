"""``featcache get``: what ``get_features`` answers for some entities of a view, for debugging.

The read goes through ``FeatureCache.get_features`` as a serving process's does (a miss is read
from SQL and written back), without the L1 (a one-shot process has nothing in it) and without
counting the read for popularity (a debugging read is not traffic). Per entity: each value,
the status, the tier that answered, the row's age (now minus when it was read from SQL, or
written by a writer) and its event time; and what Redis held for the row just before the
call: no key, a row (its event time, load time, epoch, TTL), a negative entry, a tombstone, or
a value this view cannot decode. Text on a terminal, one JSON object with ``--json``.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Final, TextIO

from featcache.client import FeatureCache
from featcache.codec import KIND_ABSENT, KIND_ROW, KIND_TOMBSTONE, RowCodec
from featcache.config import CacheConfig, FeatureView, load_config
from featcache.errors import CacheUnavailable, InvalidRequest
from featcache.redis_store import Command
from featcache.request import EntityId
from featcache.types import Status

from .hook import parse_ids

__all__ = ["lookup", "run_get"]

#: the tier each status was answered from (ABSENT: Redis when a negative entry was there)
_TIERS: Final = {
    Status.HIT_L1: "l1", Status.HIT_REDIS: "redis", Status.STALE: "redis",
    Status.FILLED: "sql", Status.ABSENT: "sql", Status.UNAVAILABLE: "none",
}


def one_shot(config: CacheConfig) -> CacheConfig:
    """``config`` for a one-shot reader: no L1 (nor its stream tail thread), no popularity
    counting, no stats published and no trace recorded: debugging reads are not traffic."""
    return config.replace(l1=replace(config.l1, policy=None),
                          popularity=replace(config.popularity, sample_rate=0),
                          stats=replace(config.stats, publish_interval=0, trace_rate=0))


def _iso(us: int | None) -> str | None:
    if us is None:
        return None
    return (dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=us)).isoformat()


def _held(raw: bytes | None, codec: RowCodec, epoch: int | None,
          ttl_ms: int | None) -> dict[str, Any]:
    """What one key held, as the read path would judge it."""
    if raw is None:
        return {"state": "no key"}
    row = codec.decode(raw)
    if row is None:
        return {"state": "undecodable", "bytes": len(raw)}
    state = {KIND_ROW: "row", KIND_ABSENT: "negative entry",
             KIND_TOMBSTONE: "tombstone"}.get(row.kind, "undecodable")
    out: dict[str, Any] = {"state": state}
    if row.kind in (KIND_ROW, KIND_ABSENT):
        out["event_timestamp"] = _iso(row.event_us)
        out["loaded_at"] = _iso(row.loaded_ms * 1000)
        out["loaded_ms"] = row.loaded_ms
        out["epoch"] = "current" if row.epoch == epoch else "old (invalidated with its view)"
    if ttl_ms is not None and ttl_ms >= 0:
        out["ttl_s"] = round(ttl_ms / 1000, 3)
    return out


def _redis_view(cache: FeatureCache, view: FeatureView,
                ids: Sequence[EntityId]) -> list[dict[str, Any]] | str:
    """What Redis holds for each id's row (one MGET and one PTTL each, in two round trips),
    or why it could not be read."""
    layout = cache.layout
    keys = layout.row_keys(view.name, ids)
    try:
        values = cache.store.read([*keys, layout.epoch_key(view.name)])
        ttls = cache.store.execute([Command("PTTL", key) for key in keys])
    except CacheUnavailable as exc:
        return str(exc)
    epoch_raw = values.pop()
    epoch = int(epoch_raw) if epoch_raw else None
    codec = cache.codecs[view.name]
    return [_held(raw, codec, epoch, int(ttl)) for raw, ttl in zip(values, ttls, strict=True)]


def lookup(cache: FeatureCache, view: FeatureView, ids: Sequence[EntityId],
           features: Sequence[str]) -> dict[str, Any]:
    """The answer of ``get_features`` for ``ids`` and ``features`` of ``view``, entity by
    entity, with what Redis held before the call."""
    ids = list(dict.fromkeys(ids))  # as get_features answers them: once each, in order
    before = _redis_view(cache, view, ids)
    result = cache.get_features(ids, [f"{view.name}:{name}" for name in features])
    now = cache.clock()
    after = _redis_view(cache, view, list(result))
    entities = []
    for i, entity in enumerate(result):
        values = result[entity]
        first = f"{view.name}:{features[0]}"
        status = result.status(entity, first)
        held = before[i] if isinstance(before, list) else None
        tier = _TIERS[status]
        if status is Status.ABSENT and held is not None and held["state"] == "negative entry" \
                and held["epoch"] == "current":
            tier = "redis"
        # the row served: what Redis held, or what this call's fill wrote
        served = held if tier == "redis" else (
            after[i] if isinstance(after, list) and status in (Status.FILLED, Status.ABSENT)
            else None)
        loaded_ms = served.get("loaded_ms") if served else None
        event = result.event_timestamp(entity, first)
        entities.append({
            "id": entity, "status": status.value, "tier": tier,
            "age_s": round(now - loaded_ms / 1000, 3) if loaded_ms is not None else None,
            "event_timestamp": event.isoformat() if event is not None else None,
            "values": {name: values[f"{view.name}:{name}"] for name in features},
            "redis_before": ({k: v for k, v in held.items() if k != "loaded_ms"}
                             if held is not None else {"state": "unavailable"}),
        })
    out: dict[str, Any] = {
        "view": view.name,
        "now": dt.datetime.fromtimestamp(now, dt.UTC).isoformat(),
        "redis": cache.store.url, "entities": entities,
    }
    if isinstance(before, str):
        out["redis_error"] = before
    return out


# ----------------------------------------------------------------------------- output


def _plain(value: Any) -> Any:
    """A value as JSON holds it: timestamps as ISO 8601, NaN and infinities as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _shown(value: Any) -> str:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, list | tuple) and len(value) > 8:
        return f"[{', '.join(map(repr, value[:8]))}, ... ({len(value)} values)]"
    return repr(value)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if abs(seconds) < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def render(answer: dict[str, Any]) -> str:
    lines = [f"view {answer['view']} on {answer['redis']} at {answer['now']}"]
    if "redis_error" in answer:
        lines.append(f"  Redis could not be read: {answer['redis_error']}")
    for item in answer["entities"]:
        lines.append(f"{item['id']!r}  {item['status']}  tier {item['tier']}  age "
                     f"{_age(item['age_s'])}  event {item['event_timestamp'] or '-'}")
        width = max(map(len, item["values"]), default=0)
        lines += [f"    {name:<{width}}  {_shown(value)}" for name, value in item["values"].items()]
        held = item["redis_before"]
        parts = [held["state"]]
        if held.get("event_timestamp"):
            parts.append(f"event {held['event_timestamp']}")
        if held.get("loaded_at"):
            parts.append(f"loaded {held['loaded_at']}")
        if "epoch" in held:
            parts.append(f"epoch {held['epoch']}")
        if "ttl_s" in held:
            parts.append(f"ttl {_age(held['ttl_s'])}")
        if "bytes" in held:
            parts.append(f"{held['bytes']} bytes")
        lines.append(f"    redis before the call: {', '.join(parts)}")
    return "\n".join(lines) + "\n"


def run_get(config_path: str, view_name: str, ids_csv: str, features_csv: str | None,
            as_json: bool = False, out: TextIO | None = None) -> dict[str, Any]:
    """``featcache get``: prints the answer."""
    config = load_config(config_path)
    view = config.view(view_name)
    ids = parse_ids(ids_csv.split(","), view, "--ids")
    if not ids:
        raise InvalidRequest("no ids given: pass --ids 1,2,3")
    features = ([name.strip() for name in features_csv.split(",") if name.strip()]
                if features_csv is not None else [f.name for f in view.features])
    if not features:
        raise InvalidRequest("no feature names given: pass --features f1,f2, or leave it out "
                             "for every feature of the view")
    with FeatureCache(one_shot(config)) as cache:
        answer = lookup(cache, view, ids, features)
    stream = out or sys.stdout
    stream.write(json.dumps(_plain(answer)) + "\n" if as_json else render(answer))
    return answer
