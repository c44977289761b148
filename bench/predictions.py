"""``python -m bench predictions``: the prediction cache against a raw MGET, and what it saves.

Part 1, all hits, interleaved as ``bench read`` interleaves (Williams orders, fresh inputs per
sample), at batches of 1, 100 and 1000 inputs, every output in Redis:

``floor_mget``        one ``MGET`` of as many keys, each as long as the cached output's key
                      of the same input and holding random bytes of exactly its size (same
                      TTL), packed by hiredis on a pooled connection, decoding nothing; the key
                      list built inside the timed call from the inputs' numbers (a list
                      lookup each: no input is encoded or hashed)
``predictions_hit``   ``cache.model("bench", version="1").get_or_compute(inputs, compute)``:
                      every input (a dict of 10 feature values: ints, floats, strings, built
                      afresh for each sample, untimed, as a request builds its inputs just
                      before it asks) encoded canonically and hashed, one read of the outputs
                      and the version's epoch, every output decoded (a float score); verified
                      all ``HIT_REDIS``
``predictions_hit_ids``  the same with entity ids (ints) as the inputs, as an embedding cache
                      keyed by entity is used: what hashing a 10-feature dict costs beside
                      hashing an id (the outputs, and so the floor, are the same sizes)

Target: ``predictions_hit`` p50 at most 1.5x ``floor_mget``'s at batch 100.

Part 2, the headline of the original design: a model that takes 2 ms a call (a busy loop, as
inference keeps a CPU busy), a stream of single-input requests whose inputs follow Zipf(1.0)
over 50,000 distinct inputs (100,000 requests; ``--quick``: 10,000 over 5,000), answered

``no_cache``          by calling the model for every request
``cached``            by ``get_or_compute`` on a cache that starts empty (no L1): hits answered
                      from Redis, misses computed once and written back

p50/p99 latency per request and the share of model calls the cache saved. Both walk the same
stream, one after the other.
"""

from __future__ import annotations

import argparse
import functools
import random
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import redis

from bench.common import (
    Case,
    Report,
    Schedule,
    Summary,
    Target,
    add_common_arguments,
    finish,
    format_table,
    log,
    percentile,
    ratios_to,
    run_context,
    run_interleaved,
)
from featcache import FeatureCache, Status
from featcache.config import CacheConfig, Feature, FeatureView, OfflineStoreConfig
from featcache.config_sections import RedisConfig, StatsConfig
from featcache.models import ModelCache
from featcache.redis_store.base import pack

DESCRIPTION = "the prediction cache: all-hit batches against a raw MGET, and a Zipf stream"

BATCHES = (1, 100, 1000)
BASELINE = "floor_mget"
CASE_ORDER = ("floor_mget", "predictions_hit", "predictions_hit_ids")
#: predictions_hit p50 at most this many times floor_mget's at batch 100
TARGET_RATIO = 1.5
TARGET_BATCH = 100
MODEL_MS = 2.0
SETUP_CHUNK = 1000


class Sample(NamedTuple):
    """One timed call's inputs: their numbers (the floor's keys, the ids case's inputs) and
    the dicts the dict case passes."""

    picked: list[int]
    inputs: list[dict[str, Any]]


@dataclass(frozen=True)
class Mode:
    inputs: int  # distinct inputs of part 1 (and of the Zipf stream)
    requests: int  # the Zipf stream's length
    schedule: Schedule


FULL = Mode(50_000, 100_000, Schedule(rounds=2000, warmup_rounds=50, budget_s=25.0))
QUICK = Mode(5_000, 10_000, Schedule(rounds=300, warmup_rounds=20, budget_s=5.0))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "fewer rounds, a 10,000-request stream over 5,000 inputs")


def run(args: argparse.Namespace) -> int:
    mode = QUICK if args.quick else FULL
    rng = random.Random(args.seed)
    with run_context(args.redis_url) as ctx, tempfile.TemporaryDirectory() as tmp, \
            _cache(ctx.target.url, ctx.target.prefix, Path(tmp)) as cache:
        inputs = [make_input(i, rng) for i in range(mode.inputs)]
        summaries = _hits(cache, ctx.target.url, ctx.target.prefix, inputs, mode, rng)
        stream = zipf_stream(mode.inputs, mode.requests, args.seed)
        cache.model("zipf", version="1").invalidate()  # the stream starts on an empty cache
        headline = _stream(cache, inputs, stream)
        setup = ctx.setup(args.seed)
        print(ctx.header("bench predictions", args.quick, setup))
    ratios = ratios_to(BASELINE, summaries)
    print("\nall hits, p50/p99 per call:")
    print(format_table(summaries, ratios, BASELINE))
    print(f"\nZipf(1.0) stream: {len(stream):,} requests over {mode.inputs:,} inputs, a model "
          f"of {MODEL_MS:g} ms a call")
    for name in ("no_cache", "cached"):
        h = headline[name]
        print(f"  {name:9} p50 {h['p50_ms']:.3f} ms, p99 {h['p99_ms']:.3f} ms, "
              f"{h['model_calls']:,} model calls")
    print(f"  inference saved: {headline['saved']:.1%}")
    report = Report(summaries, ratios, ctx.server, args.quick,
                    targets=_targets(summaries, headline),
                    extra={"setup": setup, "stream": headline})
    return finish(report, args.json, ctx.started)


@contextmanager
def _cache(url: str, prefix: str, tmp: Path) -> Iterator[FeatureCache]:
    """A cache with no L1 and no stats publishing: the read is Redis's, as the floor's."""
    view = FeatureView(name="unused", table="unused", entity_column="entity_id",
                       event_timestamp_column="ts",
                       features=(Feature("x", "int", "1h"),))
    config = CacheConfig(views=(view,), redis=RedisConfig(url=url, key_prefix=prefix),
                         offline_store=OfflineStoreConfig(url=f"sqlite:///{tmp / 'o.db'}"),
                         stats=StatsConfig(publish_interval=0))
    cache = FeatureCache(config)
    try:
        yield cache
    finally:
        cache.close()


def make_input(i: int, rng: random.Random) -> dict[str, Any]:
    """A model input as a ranking service builds one: ten feature values of a user."""
    return {"user_id": i, "age": 18 + i % 60, "clicks_7d": rng.randrange(500),
            "ctr": round(rng.random(), 6), "spend": round(rng.uniform(0, 900), 2),
            "country": rng.choice(("DE", "FR", "US", "JP", "BR")), "vip": i % 17 == 0,
            "sessions": rng.randrange(40), "recency_days": rng.random() * 30,
            "segment": f"s{i % 23}"}


def score(inputs: list[dict[str, Any]]) -> list[float]:
    return [float(x["ctr"]) * 0.5 + float(x["age"]) / 100 for x in inputs]


def zipf_stream(distinct: int, requests: int, seed: int) -> list[int]:
    """Input numbers of a request stream: Zipf(1.0) over ``distinct`` inputs, input ``k``
    asked with probability proportional to 1/(k+1)."""
    weights = 1.0 / np.arange(1, distinct + 1)
    picks = np.random.default_rng(seed).choice(distinct, size=requests, p=weights / weights.sum())
    return [int(k) for k in picks]


def _hits(cache: FeatureCache, url: str, prefix: str, inputs: list[dict[str, Any]],
          mode: Mode, rng: random.Random) -> list[Summary]:
    model = cache.model("bench", version="1")
    by_id = cache.model("bench-ids", version="1")
    ids = list(range(len(inputs)))
    started = time.perf_counter()
    for start in range(0, len(inputs), SETUP_CHUNK):
        done = model.get_or_compute(inputs[start : start + SETUP_CHUNK], compute=score)
        done_ids = by_id.get_or_compute(ids[start : start + SETUP_CHUNK],
                                        compute=lambda b: score([inputs[i] for i in b]))
        if {*done.statuses, *done_ids.statuses} != {Status.COMPUTED}:
            raise RuntimeError("setup: every output must be computed once")
    plain = redis.Redis.from_url(url)
    floor_keys = _write_floor_keys(plain, model, inputs)
    log(f"redis: {len(inputs):,} outputs and as many floor keys "
        f"({time.perf_counter() - started:.1f} s)")
    pool = plain.connection_pool

    def floor_mget(sample: Sample) -> list[Any]:
        conn = pool.get_connection()
        try:
            conn.send_packed_command(  # type: ignore[no-untyped-call]
                [pack(("MGET", *[floor_keys[i] for i in sample.picked]))])
            values: list[Any] = conn.read_response()
        finally:
            pool.release(conn)
        return values

    def predictions_hit(sample: Sample) -> Any:
        return model.get_or_compute(sample.inputs, compute=score)

    def predictions_hit_ids(sample: Sample) -> Any:
        return by_id.get_or_compute(sample.picked, compute=score)

    def new_sample(batch: int) -> Sample:
        picked = rng.sample(range(len(inputs)), batch)
        # a request builds its inputs just before it asks (from the features it read): new
        # dicts, as the serving code's would be, not ones last touched a thousand calls ago
        return Sample(picked, [dict(inputs[i]) for i in picked])

    def all_values(_: Any, out: object) -> None:
        if not isinstance(out, list) or any(v is None for v in out):
            raise RuntimeError("floor_mget: a key was missing")

    def all_hits(_: Any, out: object) -> None:
        statuses = getattr(out, "statuses", [])
        if any(s is not Status.HIT_REDIS for s in statuses):
            raise RuntimeError("predictions_hit: not every output was a Redis hit")

    cases = [Case("floor_mget", floor_mget, verify=all_values),
             Case("predictions_hit", predictions_hit, verify=all_hits),
             Case("predictions_hit_ids", predictions_hit_ids, verify=all_hits)]
    summaries: list[Summary] = []
    try:
        for batch in BATCHES:
            log(f"all hits, batch {batch}...")
            samples = run_interleaved(cases, functools.partial(new_sample, batch),
                                      mode.schedule)
            summaries += [Summary.of(c.name, batch, samples.by_case[c.name]) for c in cases]
    finally:
        plain.close()
    return summaries


def _write_floor_keys(plain: redis.Redis, model: ModelCache, inputs: Sequence[dict[str, Any]]
                      ) -> list[str]:
    """For each cached output, a key of the same length as its key holding random bytes of
    its size, with the outputs' TTL: the same bytes for Redis to parse, hash, find and send.
    The keys, in input order."""
    ttl_ms = int(model.policy.ttl * 1000)
    keys = model.keys_of(inputs)
    sizes_seen = plain.pipeline(transaction=False)
    for key in keys:
        sizes_seen.strlen(key)
    sizes = sizes_seen.execute()
    floor_keys = [key.replace(":m:", ":f:", 1) for key in keys]
    pipe = plain.pipeline(transaction=False)
    for i, (key, size) in enumerate(zip(floor_keys, sizes, strict=True)):
        if not size:
            raise RuntimeError(f"setup: output {i} is not in Redis")
        pipe.set(key, random.randbytes(int(size)), px=ttl_ms)
        if i % SETUP_CHUNK == SETUP_CHUNK - 1:
            pipe.execute()
    pipe.execute()
    return floor_keys


def _busy_model(inputs: list[dict[str, Any]]) -> list[float]:
    """A model of ``MODEL_MS`` a call, busy the whole time as inference is."""
    until = time.perf_counter() + MODEL_MS / 1000
    while time.perf_counter() < until:
        pass
    return score(inputs)


def _stream(cache: FeatureCache, inputs: list[dict[str, Any]], stream: list[int]
            ) -> dict[str, Any]:
    model = cache.model("zipf", version="1")
    log(f"Zipf stream without the cache ({len(stream):,} requests)...")
    plain_ns: list[int] = []
    for k in stream:
        request = [inputs[k]]
        began = time.perf_counter_ns()
        _busy_model(request)
        plain_ns.append(time.perf_counter_ns() - began)
    log("... and with it")
    cached_ns: list[int] = []
    computed = 0
    for k in stream:
        request = [inputs[k]]
        began = time.perf_counter_ns()
        result = model.get_or_compute(request, compute=_busy_model)
        cached_ns.append(time.perf_counter_ns() - began)
        computed += result.statuses[0] is Status.COMPUTED
    return {
        "requests": len(stream),
        "distinct_inputs": len(set(stream)),
        "model_ms": MODEL_MS,
        "no_cache": {**_latency(plain_ns), "model_calls": len(stream)},
        "cached": {**_latency(cached_ns), "model_calls": computed},
        "saved": 1 - computed / len(stream),
    }


def _latency(samples_ns: list[int]) -> dict[str, float]:
    ordered = sorted(samples_ns)
    return {"p50_ms": round(percentile(ordered, 0.5) / 1e6, 4),
            "p99_ms": round(percentile(ordered, 0.99) / 1e6, 4)}


def _targets(summaries: Sequence[Summary], headline: dict[str, Any]) -> list[Target]:
    by = {(s.case, s.batch): s for s in summaries}
    hit, floor = by[("predictions_hit", TARGET_BATCH)], by[("floor_mget", TARGET_BATCH)]
    ratio = hit.p50_us / floor.p50_us
    cached, plain = headline["cached"], headline["no_cache"]
    return [
        Target(f"predictions_hit p50 <= {TARGET_RATIO}x floor_mget at batch {TARGET_BATCH}",
               ratio <= TARGET_RATIO,
               f"{hit.p50_us:.1f} us vs {floor.p50_us:.1f} us: {ratio:.2f}x"),
        Target("the Zipf stream's p50 with the cache below its p50 without",
               cached["p50_ms"] < plain["p50_ms"],
               f"{cached['p50_ms']:.3f} ms vs {plain['p50_ms']:.3f} ms; inference saved "
               f"{headline['saved']:.1%}"),
    ]
