"""``FeatureCache``: the facade serving code holds. It validates calls and adds the read path.

Data flows one way: the caller -> (L1) -> Redis -> SQL (``featcache.readpath``), fills flow
back into Redis; the parts every writer has (the stores, the fenced writer, invalidation,
popularity) come from ``featcache.parts``. The stores (``redis_store``, ``offline``) only move
bytes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from os import PathLike
from typing import TYPE_CHECKING, Any

from featcache.access_trace import AccessTrace
from featcache.config import CacheConfig, FeatureView, load_config
from featcache.errors import ConfigError, InvalidRequest
from featcache.invalidation import InvalidationReport
from featcache.keys import is_model_space, model_of_space, model_space
from featcache.l1 import L1Cache
from featcache.models import ModelCache, ModelPolicy, ModelShared
from featcache.parts import Clock, Parts
from featcache.popularity import PopularityCounter
from featcache.readpath import L1_RECORD_WIDTH, L1Entry, ReadPath
from featcache.request import (
    EntityId,
    Plan,
    Planner,
    distinct_ids,
    id_sequence,
    normalize_ids,
)
from featcache.result import FeatureResult
from featcache.stats_publish import StatsPublisher
from featcache.subscriber import InvalidationSubscriber
from featcache.writes import Fence, PendingWrite, PutReport

if TYPE_CHECKING:
    import redis
    import sqlalchemy as sa

__all__ = ["FeatureCache", "Fence", "PendingWrite", "PutReport"]

log = logging.getLogger("featcache")

_STREAM_BLOCK_MS = 500  # how long one XREAD waits: bounds how long close() takes
_MODEL_CACHES = 1024  # ``model()`` keeps this many ModelCache objects for reuse



class FeatureCache(Parts):
    """Batched read-through cache of feature rows: Redis in front of a SQL offline store.

    The ``Parts`` every writer has (``featcache.parts``: stores, fenced writes, invalidation,
    popularity), plus the read path, the optional L1 and the L1's tail of the invalidation
    stream. ``clock``, ``redis_client`` and ``engine``: as for ``Parts``.
    """

    def __init__(
        self,
        config: CacheConfig,
        *,
        clock: Clock = time.time,
        redis_client: redis.Redis | None = None,
        engine: sa.Engine | None = None,
    ) -> None:
        super().__init__(config, clock=clock, redis_client=redis_client, engine=engine)
        self._planner = Planner(config, self.codecs)
        self._l1: L1Cache[L1Entry] | None = None
        model_l1: L1Cache[bytes] | None = None
        if config.l1.policy is not None:
            # L1 measures its bounds on a monotonic clock; an injected clock (tests) drives both
            l1_clock = time.monotonic if clock is time.time else clock
            self._l1 = L1Cache(config.l1, clock=l1_clock, record_width=L1_RECORD_WIDTH)
            # model outputs have an L1 of their own (values of another shape), same bounds
            model_l1 = L1Cache(config.l1, clock=l1_clock)
        self._models = ModelShared(model_l1)
        self._model_caches: dict[tuple[str, ModelPolicy], ModelCache] = {}
        self._popularity = self.popularity_counts if config.popularity.sample_rate > 0 else None
        #: the sampled trace of reads for ``featcache analyze`` (``stats.trace_rate`` > 0)
        self.access_trace: AccessTrace | None = None
        if config.stats.trace_rate > 0:
            self.access_trace = AccessTrace(self.store, self.layout, config.stats.trace_rate,
                                            config.stats.trace_window,
                                            max_ids=config.stats.trace_max_ids, clock=clock)
        self._read = ReadPath(
            config, self.layout, self.store, self.offline, self.stats_counters, clock, self._l1,
            self._popularity, self.access_trace,
        )
        #: this process's counters, published for ``featcache stats`` (``stats`` section)
        self.stats_publisher = StatsPublisher(
            self.store, self.layout, config.stats, (self.stats_counters, self._models.counts),
            clock=clock)
        self.stats_publisher.start()
        self._subscriber: InvalidationSubscriber | None = None
        if self._l1 is not None and model_l1 is not None:
            l1, outputs_l1 = self._l1, model_l1

            def on_ids(name: str, ids: list[EntityId]) -> None:
                (outputs_l1 if is_model_space(name) else l1).invalidate(name, ids)

            def on_view(name: str) -> None:
                (outputs_l1 if is_model_space(name) else l1).invalidate_view(name)

            def on_reset(reason: str) -> None:
                l1.clear()
                outputs_l1.clear()

            self._subscriber = InvalidationSubscriber(
                lambda: self.store.open_tail(_STREAM_BLOCK_MS / 1000 + 5.0),
                self.layout.stream_key(),
                on_ids=on_ids,
                on_view=on_view,
                on_reset=on_reset,
                block_ms=_STREAM_BLOCK_MS,
                name=f"featcache-l1-{config.redis.key_prefix}",
            )
            try:
                self._subscriber.start()
            except BaseException:
                # without the tail, L1 could serve invalidated rows; quietly running without
                # the L1 configured would hide that for the process's whole life: the caller
                # (or its supervisor) retries, as docs/consistency.md says
                self._subscriber = None
                self.close()
                raise

    @classmethod
    def from_config(cls, path: str | PathLike[str], **kwargs: Any) -> FeatureCache:
        """Load a YAML config (``FEATCACHE_...`` environment overrides apply)."""
        return cls(load_config(path), **kwargs)

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Stop the invalidation tail (within about a second), publish the last stats and
        release the pools."""
        if getattr(self, "_subscriber", None) is not None:
            assert self._subscriber is not None
            self._subscriber.stop()
        publisher: StatsPublisher | None = getattr(self, "stats_publisher", None)
        if publisher is not None:
            publisher.close()
        trace: AccessTrace | None = getattr(self, "access_trace", None)
        if trace is not None:
            trace.close()
        super().close()

    def __enter__(self) -> FeatureCache:
        return self

    # ------------------------------------------------------------------ invalidation

    def invalidate(
        self, view: str | FeatureView, entity_ids: Iterable[Any] | None = None
    ) -> InvalidationReport:
        """``Parts.invalidate``; this process's own L1 drops the rows at once, without waiting
        for its stream entry."""
        view_def = self.view(view)
        report = super().invalidate(view_def, entity_ids)
        if self._l1 is not None:
            if report.whole_view:
                self._l1.invalidate_view(view_def.name)
            else:
                self._l1.invalidate(view_def.name, report.ids)
        return report

    # ------------------------------------------------------------------ model outputs

    def model(self, name: str, version: str, **policy: Any) -> ModelCache:
        """The prediction cache of one model version (``featcache.models``): ``get_or_compute``
        a batch of inputs, ``invalidate`` the version or some inputs. ``policy``: the fields
        of ``ModelPolicy`` (``ttl``, ``early_refresh``, ``lease``, ``lease_ttl``,
        ``lease_wait``, ``l1``, ``max_inputs``). Cheap to call per request: the same name,
        version and policy give the same object."""
        try:
            space = model_space(name, version)
            settings = ModelPolicy(**policy)
        except TypeError:
            known = ", ".join(ModelPolicy.__dataclass_fields__)
            raise InvalidRequest(f"model() takes the policy fields {known}; got "
                                 f"{', '.join(sorted(policy))}") from None
        except ConfigError:
            raise
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        found = self._model_caches.get((space, settings))
        if found is not None:
            return found
        if len(self._model_caches) >= _MODEL_CACHES:  # versions made on the fly: start over
            self._model_caches.clear()
        made = self._model_caches[(space, settings)] = ModelCache(
            name, version, space, settings, store=self.store, layout=self.layout,
            invalidator=self.invalidator, breaker=self._read.breaker,
            outage=self._read.redis_outage, shared=self._models,
            fill_window=self.config.invalidation.fill_window, clock=self.clock)
        return made

    def model_stats(self) -> dict[tuple[str, str], dict[str, int]]:
        """This process's prediction cache counters (``MODEL_EVENTS``) per (model, version)
        asked for so far; ``ModelCache.stats`` gives one version's."""
        return {model_of_space(space): counts
                for space, counts in self._models.counts.snapshot().items()}

    @property
    def l1(self) -> L1Cache[L1Entry] | None:
        """The in-process cache (``l1.policy`` in the config), or None."""
        return self._l1

    @property
    def popularity(self) -> PopularityCounter | None:
        """Read counting for the warmer (``popularity.sample_rate`` > 0), or None."""
        return self._popularity

    def subscriber_stats(self) -> dict[str, Any]:
        """The invalidation tail's counters (applied, resets, lag), or {} without an L1."""
        return self._subscriber.stats() if self._subscriber is not None else {}

    # ------------------------------------------------------------------ read path

    def get_features(
        self, entity_ids: Iterable[EntityId], feature_names: Sequence[str]
    ) -> FeatureResult:
        """Every requested feature of every entity, each with a status; see DESIGN section 2.

        Raises ``InvalidRequest`` subclasses before any I/O for bad arguments, and
        ``OfflineStoreUnavailable``/``OfflineStoreError`` only when SQL fails for a row that has
        no value within ``stale_if_error`` to serve instead.
        """
        prepared = self.prepare(entity_ids, feature_names)
        if type(prepared) is FeatureResult:
            return prepared
        return self._read.read(*prepared)

    def prepare(
        self, entity_ids: Iterable[EntityId], feature_names: Sequence[str]
    ) -> tuple[Plan, list[EntityId], bool] | FeatureResult:
        """A call validated and planned: ``(plan, ids, checked)`` for ``ReadPath.read`` (or
        its steps), or the answer to a call of no ids. Raises what ``get_features`` raises for
        bad arguments (both clients validate here)."""
        if isinstance(feature_names, str):
            raise InvalidRequest(
                f"feature_names must be a list of names, not the string {feature_names!r}; "
                f"write [{feature_names!r}]"
            )
        try:
            plan = self._planner.plan(tuple(feature_names))
        except TypeError:
            raise InvalidRequest("feature_names must be a list of strings") from None
        given = id_sequence(entity_ids)
        if self._read.l1 is not None:
            distinct = distinct_ids(given, plan.entity_type)
            if distinct is not None:  # limits checked only if L1 does not answer them all
                return plan, distinct, False
        ids = normalize_ids(given, plan.entity_type, self.config.limits.max_id_length)
        if not ids:
            return FeatureResult(ids, plan, [{} for _ in plan.views])
        return plan, ids, True

    @property
    def read_path(self) -> ReadPath:
        """The read path, whose steps the async client drives (``featcache.async_client``)."""
        return self._read
