"""The long-running warmer (DESIGN section 5): ``featcache warmer --config C``.

An APScheduler 3 ``BlockingScheduler`` runs, per view, a **warm** job
(``featcache.materialize.warm_once``: the top K most read entities whose rows are missing or
expire within the horizon are rewritten)
and, when ``follow_changes`` is configured and the view has an ``updated_at`` column, a
**follow-changes** job (``changes.follow_changes``). Every job has ``coalesce=True``,
``max_instances=1``, the configured jitter and misfire grace time. Both jobs of a view share one
leader lease (``leader.ViewLeader``), kept while the warmer runs and released when it stops,
so several warmers can run: only the leader of a view works on it.

It runs on the ``warmer:`` section of the config (``WarmerConfig``, documented and validated
with the rest of the file in ``featcache.config_warmer``: a bad value fails at load, naming its
path).

Stopping: SIGTERM or SIGINT calls ``scheduler.shutdown(wait=True)``: a running cycle finishes
(its writes are per chunk, atomic per key, so no row is ever half written), the leases are
released and the process exits 0.

Health: per job, the last run and success time, the last error and the count of failed
cycles (``errors_total``), whether the last cycle succeeded (``ok``) and ran to its end
(``complete``: false when the view's lease was lost part-way, which is then neither a success
nor leadership), rows warmed (warm) or rewritten (follow changes), and, for follow-changes, the
changes found (``changed``, ``late``: behind the watermark) and the lag (now - watermark). Kept
in memory (``Warmer.health``: this warmer's own) and in Redis, per view, twice: the warmer's
own entry (with a TTL, so several warmers each show their own and a dead one's disappears),
and the view's record, written only by cycles run as the view's leader (``Warmer`` says
where). ``featcache warmer --health --config C`` prints both with the lease's current holder
(``health``), so a leader failing every cycle shows even while standbys skip theirs
successfully.

Metrics: with a metrics port, ``featcache.metrics.CacheCollector`` (the warmer's cache) and
``WarmerCollector`` (runs, errors, rows warmed, last run/success/error times, the last
success as the view's leader, leader, watermark and lag per job, from ``Warmer.job_metrics()``,
and the warmer's id) are served on ``http://<addr>:<port>/metrics``,
read at scrape time (docs/metrics.md).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from types import FrameType
from typing import Any, TextIO

from apscheduler.schedulers.base import BaseScheduler
from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from featcache.config import CacheConfig, L1Config, load_config
from featcache.config_warmer import FollowChangesConfig, WarmerConfig
from featcache.errors import ConfigError
from featcache.leader import ViewLeader, default_owner, lease_holder
from featcache.materialize import warm_once
from featcache.metrics import CacheCollector, MetricsServer, new_registry, serve_metrics
from featcache.parts import Parts
from featcache.redis_store import Command, LuaScript, ScriptCall

from .changes import follow_changes

__all__ = [
    "JobMetrics",
    "Warmer",
    "WarmerCollector",
    "build_scheduler",
    "health",
    "run_warmer",
]

log = logging.getLogger("featcache.warmer")

#: how long a warmer's own health entry outlives its last write (cycles and heartbeats)
HEALTH_TTL_S = 120.0
# KEYS[1]: a key; ARGV[1]: a TTL in ms. Sets it unless the key already has a longer one.
_EXTEND_TTL = LuaScript("""
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
  return redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return 0
""")


# ----------------------------------------------------------------------------- jobs and health


@dataclass(slots=True)
class JobMetrics:
    """One job's numbers for Prometheus (``WarmerCollector``), kept apart from the JSON health
    because Prometheus wants epoch seconds and counts, and the lag must keep growing between
    polls: it is computed from ``watermark_s`` at scrape time."""

    runs: int = 0
    errors: int = 0
    rows: int = 0
    changed: int = 0
    last_run_s: float | None = None
    last_success_s: float | None = None
    last_error_s: float | None = None
    leader_last_success_s: float | None = None
    watermark_s: float | None = None
    leader: bool | None = None


class Warmer:
    """The jobs of one warmer process: one leader lease per view, health kept per job.

    ``id`` (``host:pid:random``) names this warmer: it is the token of every lease it takes and
    the key of its own health entries. Health goes to three places per view: the warmer's own
    entry ``<prefix>:~<view>:warmer:instance:<id>`` (every cycle; a TTL of ``health_ttl_s``,
    refreshed by every cycle and by ``heartbeat``, so a dead warmer's entry expires), the
    registry ``<prefix>:~<view>:warmer:instances`` that lists the ids, and the view's record
    ``<prefix>:~<view>:warmer:health``, written only by cycles that ran as the view's leader:
    a standby's skipped cycle never hides the leader's outcome.
    """

    def __init__(self, cache: Parts, settings: WarmerConfig, *,
                 warmer_id: str | None = None, health_ttl_s: float = HEALTH_TTL_S) -> None:
        if health_ttl_s <= 0:
            raise ValueError(f"health_ttl_s must be positive, got {health_ttl_s}")
        self.cache = cache
        self.settings = settings
        #: the views it runs: ``settings.views``, or every view of the cache
        self.views = settings.views_among(v.name for v in cache.config.views)
        self.id = warmer_id or default_owner()
        self.health_ttl_s = health_ttl_s
        self.started = _iso(time.time())
        store = cache.store
        self.leaders = {
            view: ViewLeader(store, cache.layout, view, settings.lease_ttl, owner=self.id)
            for view in self.views
        }
        self._lock = threading.Lock()
        self.health: dict[str, dict[str, Any]] = {}
        self._metrics: dict[tuple[str, str], JobMetrics] = {}

    def job_metrics(self) -> dict[tuple[str, str], JobMetrics]:
        """A copy of every job's numbers, keyed by (view, job)."""
        with self._lock:
            return {key: replace(m) for key, m in self._metrics.items()}

    def warm(self, view: str) -> None:
        s = self.settings
        self._run("warm", view, lambda: self._warm(view, s))

    def _warm(self, view: str, s: WarmerConfig) -> dict[str, Any]:
        report = warm_once(self.cache, view, k=s.k, horizon_s=s.horizon,
                           leader=self.leaders[view], chunk_rows=s.chunk_rows)
        done = report.materialized
        return {"leader": report.leader, "rows": done.rows_written if done else 0,
                "complete": done.complete if done else True}

    def follow(self, view: str) -> None:
        follow = self.settings.follow_changes
        assert follow is not None
        self._run("changes", view, lambda: self._follow(view, follow))

    def _follow(self, view: str, follow: FollowChangesConfig) -> dict[str, Any]:
        report = follow_changes(self.cache, view, rewrite=follow.rewrite,
                                leader=self.leaders[view], chunk_rows=self.settings.chunk_rows,
                                change_query=follow.change_queries.get(view),
                                lookback_s=follow.lookback, start=follow.start)
        out: dict[str, Any] = {"leader": report.leader, "rows": report.rewritten,
                               "changed": report.changed, "complete": report.complete}
        if report.leader:
            out["late"] = report.late
            out["lag_s"] = report.lag_s
            out["watermark"] = report.watermark
        return out

    def _run(self, job: str, view: str, work: Callable[[], dict[str, Any]]) -> None:
        """Run one cycle; record its health; never let an error kill the scheduler thread."""
        started = time.time()
        fields: dict[str, Any] = {"last_run": _iso(started)}
        result: dict[str, Any] | None = None
        try:
            result = work()
        except Exception as exc:  # recorded and logged, the next cycle retries
            fields["last_error"] = f"{_iso(time.time())} {type(exc).__name__}: {exc}"
            log.error("warmer job=%s view=%s ok=false error=%s: %s", job, view,
                      type(exc).__name__, exc)
        ended = time.time()
        rows = 0
        with self._lock:
            kept = self.health.setdefault(f"{view}/{job}", {})
            numbers = self._metrics.setdefault((view, job), JobMetrics())
            numbers.runs += 1
            numbers.last_run_s = started
            if result is None:
                # a cycle that raised while holding the lease failed as the view's leader
                led = self.leaders[view].held
                numbers.errors += 1
                numbers.last_error_s = ended
                fields["ok"] = False
                fields["errors_total"] = numbers.errors
            else:
                # a cycle that lost the view's lease part-way (another warmer took over) did
                # its rows, but it is no success and this warmer is no longer the leader
                complete = result.pop("complete", True)
                led = result.pop("leader")
                fields["ok"] = fields["complete"] = complete
                if complete:
                    fields["last_success"] = _iso(ended)
                    numbers.last_success_s = ended
                    if led:
                        numbers.leader_last_success_s = ended
                fields["leader"] = led and complete
                rows = result.pop("rows")
                fields["rows_last"] = rows
                fields["rows_total"] = kept.get("rows_total", 0) + rows
                fields.update(result)
                numbers.leader = fields["leader"]
                numbers.rows += rows
                numbers.changed += result.get("changed", 0)
                if result.get("watermark"):
                    numbers.watermark_s = dt.datetime.fromisoformat(
                        result["watermark"]).timestamp()
            kept.update(fields)
        if result is not None:
            log.info("warmer job=%s view=%s ok=true %s seconds=%.3f", job, view,
                     " ".join(f"{k}={v}" for k, v in fields.items() if k != "last_run"),
                     ended - started)
        try:
            self._store_health(view, job, fields, led, rows)
        except Exception as exc:  # health is best effort; Redis may be down
            log.warning("warmer job=%s view=%s health not stored: %s", job, view, exc)

    def _store_health(self, view: str, job: str, fields: Mapping[str, Any], led: bool,
                      rows: int) -> None:
        """This warmer's entry; and, for a cycle run as the view's leader, the view's record
        (its totals summed over every leader the view has had)."""
        own = {f"{job}.{k}": json.dumps(v) for k, v in fields.items()}
        commands, scripts = self._register(view, own)
        if led:
            record = self.cache.layout.health_key(view)
            shared = {f"{job}.{k}": json.dumps(v) for k, v in fields.items()
                      if k not in ("leader", "rows_total", "errors_total")}
            shared[f"{job}.warmer"] = json.dumps(self.id)
            commands.append(Command("HSET", record, _flat(shared)))
            # a JSON integer is its digits: the totals are counted by the server
            commands.append(Command("HINCRBY", record, (f"{job}.rows_total", rows)))
            if not fields["ok"] and "last_error" in fields:
                commands.append(Command("HINCRBY", record, (f"{job}.errors_total", 1)))
        self.cache.store.execute(commands)
        self.cache.store.eval_scripts(scripts)

    def _register(self, view: str, fields: Mapping[str, str]
                  ) -> tuple[list[Command], list[ScriptCall]]:
        """The writes that keep this warmer's entry for ``view`` alive for one more
        ``health_ttl_s``, and forget the ids whose entries expired a TTL ago (a dead warmer's;
        a TTL of margin for clock skew between warmers)."""
        now_ms = int(time.time() * 1000)
        ttl_ms = max(1, int(self.health_ttl_s * 1000))
        layout = self.cache.layout
        own = layout.warmer_key(view, self.id)
        registry = layout.warmers_key(view)
        entry = {"started": json.dumps(self.started),
                 "last_seen": json.dumps(_iso(now_ms / 1000)), **fields}
        commands = [
            Command("HSET", own, _flat(entry)),
            Command("PEXPIRE", own, (ttl_ms,)),
            Command("ZADD", registry, (now_ms + ttl_ms, self.id)),
            Command("ZREMRANGEBYSCORE", registry, ("-inf", now_ms - ttl_ms)),
        ]
        # the registry lives as long as its longest-lived entry: never shortened by a warmer
        # with a shorter TTL than another's (what PEXPIRE ... GT does, on Redis 7 only)
        return commands, [ScriptCall(_EXTEND_TTL, [registry], [ttl_ms])]

    def heartbeat(self) -> None:
        """Refresh this warmer's entries (run by the scheduler every third of their TTL, so a
        live warmer stays listed between cycles of any schedule)."""
        try:
            commands: list[Command] = []
            scripts: list[ScriptCall] = []
            for view in self.views:
                more, extend = self._register(view, {})
                commands += more
                scripts += extend
            self.cache.store.execute(commands)
            self.cache.store.eval_scripts(scripts)
        except Exception as exc:  # best effort, as every health write
            log.warning("warmer heartbeat not stored: %s", exc)

    def release(self) -> None:
        """Give every lease up (at shutdown), so another warmer can take over at once, and
        remove this warmer's own entries (the views' records stay)."""
        for leader in self.leaders.values():
            try:
                leader.release()
            except Exception as exc:  # it expires on its own anyway
                log.warning("warmer view=%s lease not released: %s", leader.view, exc)
        layout = self.cache.layout
        try:
            self.cache.store.execute([
                command for view in self.views for command in (
                    Command("DEL", layout.warmer_key(view, self.id)),
                    Command("ZREM", layout.warmers_key(view), (self.id,)),
                )
            ])
        except Exception as exc:  # they expire on their own
            log.warning("warmer health entries not removed: %s", exc)


class WarmerCollector(Collector):
    """``featcache_warmer_*`` families from a ``Warmer``'s job numbers, built at each scrape
    (docs/metrics.md). Labels: ``view``, and ``job`` (``warm`` or ``changes``)."""

    def __init__(self, warmer: Warmer, clock: Callable[[], float] = time.time,
                 namespace: str = "featcache") -> None:
        self.warmer = warmer
        self.clock = clock
        self.ns = namespace

    def describe(self) -> Iterable[Metric]:
        """The families without samples, so a registry can check names without a scrape."""
        return list(self._families({}, None))

    def collect(self) -> Iterable[Metric]:
        return list(self._families(self.warmer.job_metrics(), self.warmer.id))

    def _families(self, jobs: Mapping[tuple[str, str], JobMetrics],
                  warmer_id: str | None) -> Iterator[Metric]:
        ns, labels = self.ns, ["view", "job"]
        runs = CounterMetricFamily(f"{ns}_warmer_runs", "Cycles run per job", labels=labels)
        errors = CounterMetricFamily(f"{ns}_warmer_errors", "Cycles that raised per job",
                                     labels=labels)
        rows = CounterMetricFamily(
            f"{ns}_warmer_rows_warmed", "Rows written to Redis: warmed (warm) or rewritten "
            "(changes)", labels=labels)
        changed = CounterMetricFamily(
            f"{ns}_warmer_changed_entities", "Changed entities found by follow-changes polls",
            labels=["view"])
        last_run = GaugeMetricFamily(
            f"{ns}_warmer_last_run_timestamp_seconds", "When the job's last cycle started",
            labels=labels)
        last_success = GaugeMetricFamily(
            f"{ns}_warmer_last_success_timestamp_seconds",
            "When the job's last successful cycle ended (a standby's skipped cycle included)",
            labels=labels)
        last_error = GaugeMetricFamily(
            f"{ns}_warmer_last_error_timestamp_seconds", "When the job's last failed cycle ended",
            labels=labels)
        leader_success = GaugeMetricFamily(
            f"{ns}_warmer_leader_last_success_timestamp_seconds",
            "When the job's last successful cycle as the view's leader ended; the max over "
            "warmers is the view's", labels=labels)
        leader = GaugeMetricFamily(
            f"{ns}_warmer_leader", "1 if the last successful cycle held the view's lease",
            labels=labels)
        watermark = GaugeMetricFamily(
            f"{ns}_warmer_watermark_timestamp_seconds",
            "The latest upstream change time processed (follow changes)", labels=["view"])
        lag = GaugeMetricFamily(
            f"{ns}_warmer_lag_seconds", "Now minus the watermark: how far behind upstream "
            "changes the cache may be (it also grows while upstream is quiet)",
            labels=["view"])
        now = self.clock()
        for (view, job), m in sorted(jobs.items()):
            key = [view, job]
            runs.add_metric(key, m.runs)
            errors.add_metric(key, m.errors)
            rows.add_metric(key, m.rows)
            if m.last_run_s is not None:
                last_run.add_metric(key, m.last_run_s)
            if m.last_success_s is not None:
                last_success.add_metric(key, m.last_success_s)
            if m.last_error_s is not None:
                last_error.add_metric(key, m.last_error_s)
            if m.leader_last_success_s is not None:
                leader_success.add_metric(key, m.leader_last_success_s)
            if m.leader is not None:
                leader.add_metric(key, 1 if m.leader else 0)
            if job == "changes":
                changed.add_metric([view], m.changed)
                if m.watermark_s is not None:
                    watermark.add_metric([view], m.watermark_s)
                    lag.add_metric([view], max(0.0, now - m.watermark_s))
        info = GaugeMetricFamily(f"{ns}_warmer_info",
                                 "This warmer's id: its lease token and --health entry",
                                 labels=["warmer"])
        if warmer_id is not None:
            info.add_metric([warmer_id], 1)
        yield from (runs, errors, rows, changed, last_run, last_success, last_error,
                    leader_success, leader, watermark, lag, info)


def _iso(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat()


def _trigger(settings: WarmerConfig, interval_s: float | None, cron: str | None) -> BaseTrigger:
    if interval_s is None:
        assert cron is not None
        trigger = CronTrigger.from_crontab(cron, timezone=dt.UTC)
        trigger.jitter = settings.jitter or None
        return trigger
    return IntervalTrigger(seconds=interval_s, jitter=settings.jitter or None,
                           timezone=dt.UTC)


def build_scheduler(
    cache: Parts,
    settings: WarmerConfig,
    scheduler_cls: type[BaseScheduler] = BlockingScheduler,
    warmer: Warmer | None = None,
) -> BaseScheduler:
    """A scheduler (not started) with one warm job per view and, with ``follow_changes`` and an
    ``updated_at`` column or a change query, one follow-changes job, and the warmer's health
    heartbeat. Job ids: ``warm:<view>``, ``changes:<view>``, ``heartbeat``. The ``Warmer``
    holding the leases and health is ``scheduler.featcache_warmer``."""
    warmer = warmer or Warmer(cache, settings)
    scheduler = scheduler_cls(timezone=dt.UTC)
    common: dict[str, Any] = {
        "coalesce": True,
        "max_instances": 1,
        "misfire_grace_time": max(1, math.ceil(settings.misfire_grace)),
    }
    schedule, follow = settings.schedule, settings.follow_changes
    for view in warmer.views:
        scheduler.add_job(warmer.warm, _trigger(settings, schedule.interval, schedule.cron),
                          args=[view], id=f"warm:{view}", name=f"warm {view}", **common)
        if follow is None:
            continue
        if not follow.followed(cache.config.view(view)):
            log.info("warmer view=%s follow_changes=skipped reason=no_updated_at_column", view)
            continue
        scheduler.add_job(warmer.follow, _trigger(settings, follow.interval, None),
                          args=[view], id=f"changes:{view}", name=f"follow changes {view}",
                          **common)
    scheduler.add_job(warmer.heartbeat, IntervalTrigger(seconds=warmer.health_ttl_s / 3,
                                                        timezone=dt.UTC),
                      id="heartbeat", name="warmer heartbeat", **common)
    scheduler.featcache_warmer = warmer
    return scheduler


# ----------------------------------------------------------------------------- processes


def run_warmer(config_path: str, metrics_port: int | None = None,
               metrics_addr: str | None = None) -> int:
    """``featcache warmer``: run until SIGTERM/SIGINT, then stop cleanly; returns 0.
    ``metrics_port``/``metrics_addr`` (the command line) win over ``warmer.metrics_*``."""
    config = load_config(config_path)
    settings = config.warmer
    with Parts(config) as cache:
        warmer = Warmer(cache, settings)
        scheduler = build_scheduler(cache, settings, BlockingScheduler, warmer)
        metrics = _start_metrics(cache, warmer, settings, metrics_port, metrics_addr)
        stopping = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            if stopping.is_set():
                return
            stopping.set()
            log.info("warmer stopping signal=%s", signal.Signals(signum).name)
            if scheduler.running:
                scheduler.shutdown(wait=True)

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            log.info("warmer started id=%s views=%s jobs=%s", warmer.id, ",".join(warmer.views),
                     ",".join(job.id for job in scheduler.get_jobs()))
            warmer.heartbeat()  # listed in --health from the start, before any cycle ends
            if not stopping.is_set():
                scheduler.start()  # blocks until shutdown
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            warmer.release()
            if metrics is not None:
                metrics.close()
        log.info("warmer stopped")
    return 0


def _start_metrics(cache: Parts, warmer: Warmer, settings: WarmerConfig,
                   port: int | None, addr: str | None) -> MetricsServer | None:
    """The ``/metrics`` endpoint, started before the first cycle so a bad port fails the
    start (exit 2) instead of leaving a warmer nobody can watch."""
    from_cli = port is not None
    port = port if port is not None else settings.metrics_port
    if port is None:
        return None
    addr = addr or settings.metrics_addr
    registry = new_registry(CacheCollector(cache), WarmerCollector(warmer))
    try:
        server = serve_metrics(registry, port, addr)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {addr}:{port}: {exc}",
                          "--metrics-port" if from_cli else "warmer.metrics_port",
                          "" if from_cli else cache.config.source) from None
    log.info("warmer metrics url=%s", server.url)
    return server


def health(config: CacheConfig | str, out: TextIO | None = None) -> dict[str, Any]:
    """Every view's stored health, printed as one JSON line ``{"views": ...}`` when ``out`` is
    given::

        {view: {"leader": <the lease holder's id now, or None>,
                "jobs": {job: <the last cycle run as the view's leader: "warmer" (whose),
                               last_run, ok, last_success, last_error, rows_last, rows_total,
                               errors_total, ...>},
                "warmers": {<id>: {"started", "last_seen", "jobs": {job: <its own cycles>}}}}}

    ``jobs`` is written only by leaders, so a standby's skipped cycle never hides a failing
    leader; ``warmers`` lists the warmers whose entries have not expired (a clean stop removes
    its own at once)."""
    loaded = config if isinstance(config, CacheConfig) else load_config(config)
    result: dict[str, Any] = {}
    # no counting and no L1 (with its stream tail): this process only reads bookkeeping
    parts_off = loaded.replace(popularity=replace(loaded.popularity, sample_rate=0.0),
                               l1=L1Config())
    with Parts(parts_off) as cache:
        store, layout = cache.store, cache.layout
        for view in loaded.views:
            holder = lease_holder(store, layout, view.name)
            record, listed = store.execute([
                Command("HGETALL", layout.health_key(view.name)),
                Command("ZRANGE", layout.warmers_key(view.name), (0, -1)),
            ])
            ids = [_text(i) for i in listed]
            entries = store.execute([
                Command("HGETALL", layout.warmer_key(view.name, warmer_id)) for warmer_id in ids
            ]) if ids else []
            warmers: dict[str, Any] = {}
            for warmer_id, entry in zip(ids, entries, strict=True):
                if entry:  # an id whose entry expired: a warmer gone without a clean stop
                    meta, jobs = _parse_fields(_as_mapping(entry))
                    warmers[warmer_id] = {**meta, "jobs": jobs}
            result[view.name] = {"leader": holder,
                                 "jobs": _parse_fields(_as_mapping(record))[1],
                                 "warmers": warmers}
    if out is not None:
        out.write(json.dumps({"views": result}) + "\n")
    return result


def _as_mapping(reply: Any) -> Mapping[Any, Any]:
    """An HGETALL reply as a mapping: a dict under RESP3, a flat field/value list under RESP2."""
    if isinstance(reply, Mapping):
        return reply
    return dict(zip(reply[::2], reply[1::2], strict=True))


def _flat(fields: Mapping[str, str]) -> tuple[str, ...]:
    """HSET's arguments: field, value, field, value..."""
    return tuple(part for item in fields.items() for part in item)


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _parse_fields(raw: Mapping[Any, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """A health hash as (fields without a job, {job: {name: value}}); values are JSON (an
    unreadable one is None)."""
    meta: dict[str, Any] = {}
    jobs: dict[str, dict[str, Any]] = {}
    for key, value in sorted((_text(k), v) for k, v in raw.items()):
        job, dot, name = key.partition(".")
        try:
            decoded = json.loads(value)
        except ValueError:
            decoded = None
        if dot:
            jobs.setdefault(job, {})[name] = decoded
        else:
            meta[key] = decoded
    return meta, jobs


def print_health(config_path: str, out: TextIO = sys.stdout) -> int:
    """``featcache warmer --health``."""
    health(config_path, out)
    return 0
