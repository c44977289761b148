"""``featcache stats``: every serving process's published counts over a window, as a person
or a script reads them.

The figures come from ``featcache.stats_publish.read_window`` (the minutes' hashes in Redis,
summed) and ``featcache.stats_report.summarize``; this module only chooses the window, prints
and repeats (``--watch``).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from featcache.config import CacheConfig, load_config
from featcache.keys import KeyLayout
from featcache.redis_store import RedisStore, admin, open_store
from featcache.stats_publish import read_window
from featcache.stats_report import summarize, summarize_models

__all__ = ["render", "report", "run_stats"]


def report(store: RedisStore, config: CacheConfig, view: str | None, since: float,
           now: float) -> dict[str, Any]:
    """The JSON ``featcache stats --json`` prints."""
    layout = KeyLayout.for_mode(config.redis.key_prefix, config.redis.mode)
    window = read_window(store, layout, since, now)
    names = [config.view(view).name] if view is not None else [v.name for v in config.views]
    census = key_census(store, config)
    return {
        "redis": {name: census[name] for name in names},
        "prefix": config.redis.key_prefix,
        "since_s": since,
        "minutes": window.minutes,
        "until": now,
        "processes": [{"name": name, "last_published": at}
                      for name, at in sorted(window.processes.items())],
        "views": summarize(window.totals, names),
        # prediction caches are not views: a report of one view leaves them out
        "models": summarize_models(window.totals) if view is None else {},
    }


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


def render(data: dict[str, Any], out: TextIO) -> None:
    """The report for a person, in 80 columns."""
    processes = data["processes"]
    out.write(f"featcache stats, prefix {data['prefix']}: the last {data['minutes']} minute(s), "
              f"{len(processes)} process(es) reporting\n")
    if not data["views"] and not data["models"]:
        out.write("  no calls counted in this window (is stats.publish_interval 0, or no "
                  "process serving?)\n")
    for view, f in data["views"].items():
        values, calls = f["values"], f["calls"]
        hit, sql = f["latency_ms"]["hit"], f["latency_ms"]["sql"]
        out.write(f"\nview {view}\n")
        out.write(f"  values {values['total']:>12,}  L1 {_pct(f['value_hit_rate']['l1'])}  "
                  f"Redis {_pct(f['value_hit_rate']['redis'])}  from cache "
                  f"{_pct(f['value_hit_rate']['cache'])}\n")
        out.write(f"  calls  {calls['total']:>12,}  L1 {_pct(f['call_hit_rate']['l1'])}  "
                  f"Redis {_pct(f['call_hit_rate']['redis'])}  without SQL "
                  f"{_pct(f['call_hit_rate']['cache'])}\n")
        out.write(f"  latency  all hits: p50 {_ms(hit['p50'])}, p99 {_ms(hit['p99'])} "
                  f"({hit['calls']:,} calls)\n")
        out.write(f"           with SQL: p50 {_ms(sql['p50'])}, p99 {_ms(sql['p99'])} "
                  f"({sql['calls']:,} calls)\n")
        s = f["sql"]
        out.write(f"  SQL    {s['queries']:,} queries, {s['rows']:,} rows, {s['errors']:,} "
                  f"errors, {s['rejected']:,} rows refused\n")
        out.write(f"         saved {_pct(s['values_saved'])} of the values and "
                  f"{_pct(s['queries_saved'])} of the queries a cacheless read would make\n")
    for model, versions in data["models"].items():
        for version, f in versions.items():
            _render_model(model, version, f, out)
    for view, keys in data["redis"].items():
        about = "" if keys["exact"] else "about "
        out.write(f"redis {view}: {about}{keys['keys']:,} keys, {about}"
                  f"{keys['bytes'] / 2**20:,.1f} MiB (rows sampled)\n")
    now = data["until"]
    for p in processes:
        out.write(f"process {p['name']}: published {max(0.0, now - p['last_published']):.0f} s "
                  "ago\n")


def _render_model(model: str, version: str, f: dict[str, Any], out: TextIO) -> None:
    outputs, calls, rate = f["outputs"], f["calls"], f["output_hit_rate"]
    hit, computed = f["latency_ms"]["hit"], f["latency_ms"]["compute"]
    saved, events = f["inference_saved"], f["events"]
    out.write(f"\nmodel {model} version {version}\n")
    out.write(f"  outputs {outputs['total']:>11,}  L1 {_pct(rate['l1'])}  Redis "
              f"{_pct(rate['redis'])}  computed {outputs['compute']:,}\n")
    out.write(f"  calls  {calls['total']:>12,}  model called {events['compute_calls']:,} "
              f"times: saved {_pct(saved['model_calls'])} of calls, "
              f"{_pct(saved['outputs'])} of outputs\n")
    out.write(f"  latency  all hits: p50 {_ms(hit['p50'])}, p99 {_ms(hit['p99'])} "
              f"({hit['calls']:,} calls)\n")
    out.write(f"           computed: p50 {_ms(computed['p50'])}, p99 {_ms(computed['p99'])} "
              f"({computed['calls']:,} calls)\n")
    out.write(f"  writes {events['written']:,}, fenced {events['writes_fenced']:,}, late "
              f"{events['writes_late']:,}; Redis errors {events['redis_errors']:,}\n")


def run_stats(config_path: str, view: str | None, since: float, *, watch: float | None = None,
              as_json: bool = False, out: TextIO | None = None,
              clock: Callable[[], float] = time.time) -> int:
    """Print the report once, or every ``watch`` seconds until interrupted."""
    config = load_config(config_path)
    if view is not None:
        config.view(view)  # an unknown view fails before any I/O
    store = open_store(config.redis, degradation=config.degradation)
    stream = out or sys.stdout
    try:
        while True:
            data = report(store, config, view, since, clock())
            if as_json:
                stream.write(json.dumps(data) + "\n")
            else:
                if watch is not None and stream.isatty():
                    stream.write("\x1b[H\x1b[2J")  # a screen that refreshes in place
                render(data, stream)
            stream.flush()
            if watch is None:
                return 0
            time.sleep(watch)
    finally:
        store.close()


#: keys examined per server by ``key_census`` (SCAN steps of about 1000)
CENSUS_KEYS = 20_000
_SAMPLED_PER_VIEW = 20


def key_census(store: RedisStore, config: CacheConfig, limit: int = CENSUS_KEYS
               ) -> dict[str, dict[str, Any]]:
    """Redis keys and memory per view, from a bounded SCAN of each primary: exact when the
    scan reached the end, else the counts scaled by ``DBSIZE`` over the keys examined; the
    memory is the mean ``MEMORY USAGE`` of up to 20 rows per view times its keys."""
    prefix = config.redis.key_prefix
    names = {view.name for view in config.views}
    counts: dict[str, float] = {}
    samples: dict[tuple[str, str], list[str]] = {}
    exact = True
    for node in admin.primaries(store, config.redis.mode):
        dbsize = admin.key_count(node)
        found: dict[str, int] = {}
        examined = 0
        finished = False
        for page in admin.scan(node, f"{prefix}:*", count=1000):
            examined += 1000
            for key in page:
                view = _view_of(key, prefix)
                if view in names:
                    found[view] = found.get(view, 0) + 1
                    picked = samples.setdefault((node.name, view), [])
                    if len(picked) < _SAMPLED_PER_VIEW and not key[len(prefix) + 1:].startswith(
                            "~"):
                        picked.append(key)
            if examined >= limit:
                break
        else:
            finished = True
        scale = 1.0 if finished else max(1.0, dbsize / examined)
        exact = exact and finished
        for view, n in found.items():
            counts[view] = counts.get(view, 0.0) + n * scale
    memory: dict[str, float] = {}
    for node in admin.primaries(store, config.redis.mode):
        for (name, view), keys in samples.items():
            if name != node.name or not keys:
                continue
            sizes = admin.memory_usage(node, keys)
            memory.setdefault(view, 0.0)
            memory[view] = max(memory[view], sum(sizes) / len(sizes))
    return {view: {"keys": round(counts.get(view, 0.0)),
                   "bytes": round(counts.get(view, 0.0) * memory.get(view, 0.0)),
                   "exact": exact}
            for view in sorted(names)}


def _view_of(key: str, prefix: str) -> str:
    """The view a key of featcache's belongs to ('' for none): ``<p>:<view>:<id>``,
    ``<p>:{<view>:<bb>}:<id>``, ``<p>:~<view>:<name>``, ``<p>:~{<view>...}:<name>``."""
    rest = key[len(prefix) + 1:].removeprefix("~").removeprefix("{")
    return rest.split(":", 1)[0].split("}", 1)[0]
