"""The prediction cache (``FeatureCache.model``) on real servers: one compute for exactly the
missing inputs, in order; statuses; versions as namespaces; invalidation (whole version and
chosen inputs) reaching Redis and every L1, and fencing a compute that raced with it; single
flight across threads and leases across processes; bad inputs and outputs; Redis down."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from featdata import Clock, make_cache, make_view, redis_config, until

from featcache import AsyncFeatureCache, CacheConfig, FeatureCache, Status
from featcache.config_sections import OfflineStoreConfig, RedisConfig
from featcache.errors import ConfigError, InvalidRequest, ModelOutputError
from featcache.keys import model_space

pytestmark = [pytest.mark.topology, pytest.mark.client]

VIEW = make_view("mv", "mv", None)


@pytest.fixture
def offline_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'offline.db'}"


@pytest.fixture
def cache(redis_url: str, key_prefix: str, offline_url: str) -> Iterator[FeatureCache]:
    with make_cache([VIEW], redis_url, offline_url, key_prefix) as made:
        yield made


class Model:
    """A model that records every batch it is asked for: output = 2 * x['x'] (+ bias)."""

    def __init__(self, bias: float = 0.0, delay: float = 0.0) -> None:
        self.calls: list[list[Any]] = []
        self.bias = bias
        self.delay = delay
        self.lock = threading.Lock()

    def __call__(self, inputs: list[Any]) -> list[float]:
        with self.lock:
            self.calls.append(list(inputs))
        if self.delay:
            time.sleep(self.delay)
        return [2.0 * x["x"] + self.bias for x in inputs]

    @property
    def computed(self) -> list[Any]:
        return [x for call in self.calls for x in call]


def inputs(numbers: Any) -> list[dict[str, Any]]:
    return [{"x": n, "kind": "a"} for n in numbers]


def test_a_batch_of_1000_with_100_missing_computes_exactly_those_once_in_order(
        cache: FeatureCache) -> None:
    ranker = cache.model("ranker", version="2026-12-01")
    model = Model()
    order = np.random.default_rng(7).permutation(1000)
    cached = [int(n) for n in order if n % 10]  # 900 of them
    ranker.get_or_compute(inputs(cached), compute=model)
    model.calls.clear()
    batch = inputs(int(n) for n in order)
    result = ranker.get_or_compute(batch, compute=model)
    missing = [x for x in batch if x["x"] % 10 == 0]
    assert len(model.calls) == 1 and model.calls[0] == missing  # exactly those, in input order
    assert list(result) == [2.0 * x["x"] for x in batch]
    assert result.statuses == [Status.COMPUTED if x["x"] % 10 == 0 else Status.HIT_REDIS
                               for x in batch]
    assert result.status_counts() == {Status.COMPUTED: 100, Status.HIT_REDIS: 900}
    again = ranker.get_or_compute(batch, compute=model)
    assert len(model.calls) == 1 and again.status_counts() == {Status.HIT_REDIS: 1000}
    stats = ranker.stats()
    assert stats["computed"] == 1000 and stats["compute_calls"] == 2
    assert stats["hits_redis"] == 900 + 1000


def test_equal_inputs_in_one_batch_compute_once_and_get_their_own_copies(
        cache: FeatureCache) -> None:
    enc = cache.model("encoder", version="1")
    seen: list[list[Any]] = []

    def embed(batch: list[Any]) -> list[Any]:
        seen.append(batch)
        return [{"vec": [float(x["x"])] * 3} for x in batch]

    result = enc.get_or_compute([{"x": 1}, {"x": 1.5}, {"x": 1}], compute=embed)
    assert seen == [[{"x": 1}, {"x": 1.5}]]
    assert result[0] == result[2] == {"vec": [1.0, 1.0, 1.0]}
    result[0]["vec"].append(9.0)  # the caller's own object: the repeat is not changed
    assert result[2] == {"vec": [1.0, 1.0, 1.0]}
    again = enc.get_or_compute([{"x": 1}, {"x": 1}, {"x": 1.5}], compute=embed)  # all hits
    assert again.statuses == [Status.HIT_REDIS] * 3 and len(seen) == 1
    assert again[0] == again[1] == {"vec": [1.0, 1.0, 1.0]} and again[0] is not again[1]
    assert enc.stats()["hits_redis"] == 2  # distinct inputs, as computed counts them


def test_a_new_version_is_a_new_namespace_and_versions_keep_their_own_outputs(
        cache: FeatureCache) -> None:
    old, new = Model(bias=0.0), Model(bias=100.0)
    v1 = cache.model("ranker", version="v1")
    v2 = cache.model("ranker", version="v2")
    assert list(v1.get_or_compute(inputs([1, 2]), compute=old)) == [2.0, 4.0]
    result = v2.get_or_compute(inputs([1, 2]), compute=new)
    assert list(result) == [102.0, 104.0] and new.computed == inputs([1, 2])
    assert list(v1.get_or_compute(inputs([1, 2]), compute=old)) == [2.0, 4.0]
    assert len(old.calls) == 1
    assert _sync(cache.model("ranker", version="v1")) is _sync(v1)  # cheap per request


def test_invalidating_a_version_drops_every_output_in_one_step(cache: FeatureCache) -> None:
    ranker = cache.model("ranker", version="v1")
    other = cache.model("ranker", version="v2")
    model = Model()
    ranker.get_or_compute(inputs(range(50)), compute=model)
    other.get_or_compute(inputs(range(5)), compute=model)
    report = ranker.invalidate()
    assert report.whole_view and report.view == model_space("ranker", "v1")
    model.calls.clear()
    result = ranker.get_or_compute(inputs(range(50)), compute=model)
    assert result.status_counts() == {Status.COMPUTED: 50}
    assert other.get_or_compute(inputs(range(5)), compute=model).status_counts() == {
        Status.HIT_REDIS: 5}  # another version is untouched


def test_invalidating_chosen_inputs_drops_those_alone(cache: FeatureCache) -> None:
    ranker = cache.model("ranker", version="v1")
    model = Model()
    ranker.get_or_compute(inputs(range(10)), compute=model)
    report = ranker.invalidate([{"kind": "a", "x": 3}, {"x": 7, "kind": "a"}])  # key order
    assert report.entities == 2
    model.calls.clear()
    result = ranker.get_or_compute(inputs(range(10)), compute=model)
    assert model.calls == [inputs([3, 7])]
    assert [s for s in result.statuses if s is Status.COMPUTED] == [Status.COMPUTED] * 2


@pytest.mark.parametrize("whole", [True, False], ids=["version", "inputs"])
def test_an_output_computed_before_an_invalidation_never_lands_after_it(
        cache: FeatureCache, whole: bool) -> None:
    """The invalidation runs while compute runs (the model was fixed under the same version
    meanwhile): the outputs of the old code are answered to this call, not written."""
    ranker = cache.model("ranker", version="v1")

    def racing(batch: list[Any]) -> list[float]:
        ranker.invalidate(None if whole else batch)
        return [-1.0] * len(batch)

    first = ranker.get_or_compute(inputs([1, 2]), compute=racing)
    assert list(first) == [-1.0, -1.0]
    fixed = Model()
    result = ranker.get_or_compute(inputs([1, 2]), compute=fixed)
    assert list(result) == [2.0, 4.0] and fixed.calls == [inputs([1, 2])]
    if whole and cache.layout.buckets:
        # a cluster's write cannot read the epoch (another slot): the outputs land stamped
        # with the old epoch, and every reader misses them (the call above recomputed them)
        assert ranker.stats()["written"] == 2 + 2
    else:
        assert ranker.stats()["writes_fenced"] == 2


def test_an_invalidation_reaches_the_l1_of_another_os_process(
        redis_url: str, key_prefix: str, offline_url: str) -> None:
    script = Path(__file__).with_name("models_l1_worker.py")
    worker = subprocess.Popen([sys.executable, str(script), redis_url, key_prefix],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert worker.stdin is not None and worker.stdout is not None
    stdin, stdout = worker.stdin, worker.stdout

    def ask(command: str) -> dict[str, Any]:
        stdin.write(command + "\n")
        stdin.flush()
        answer: dict[str, Any] = json.loads(stdout.readline())
        return answer

    def applied() -> int:
        return int(ask("applied")["applied"])

    try:
        assert json.loads(stdout.readline()) == {"ready": True}
        assert ask("get 0") == {"outputs": [2.0, 4.0], "statuses": ["COMPUTED"] * 2}
        assert ask("get 50") == {"outputs": [2.0, 4.0], "statuses": ["HIT_L1"] * 2}
        with make_cache([VIEW], redis_url, offline_url, key_prefix) as trainer:
            before = applied()
            trainer.model("ranker", version="v1").invalidate([{"x": 1, "kind": "a"}])
            until(lambda: applied() > before, "the entry in the worker")
            assert ask("get 100") == {"outputs": [102.0, 4.0],
                                      "statuses": ["COMPUTED", "HIT_L1"]}
            before = applied()
            trainer.model("ranker", version="v1").invalidate()
            until(lambda: applied() > before, "the entry in the worker")
            assert ask("get 200") == {"outputs": [202.0, 204.0],
                                      "statuses": ["COMPUTED"] * 2}
            # a feature view's invalidation does not touch the outputs' L1
            before = applied()
            trainer.invalidate("mv")
            until(lambda: applied() > before, "the entry in the worker")
            assert ask("get 300") == {"outputs": [202.0, 204.0],
                                      "statuses": ["HIT_L1"] * 2}
        stdin.write("quit\n")
        stdin.close()
        assert worker.wait(timeout=30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


def test_concurrent_threads_compute_a_missing_input_once(cache: FeatureCache) -> None:
    ranker = cache.model("ranker", version="v1")
    model = Model(delay=0.3)
    results: list[Any] = []
    start = threading.Barrier(8)

    def ask() -> None:
        start.wait()
        results.append(ranker.get_or_compute(inputs(range(20)), compute=model))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(x["x"] for x in model.computed) == list(range(20))
    assert all(list(r) == [2.0 * n for n in range(20)] for r in results)


def test_two_processes_compute_each_missing_input_once_in_total(
        redis_url: str, key_prefix: str, tmp_path: Path) -> None:
    log = tmp_path / "computed.jsonl"
    script = Path(__file__).with_name("models_worker.py")
    procs = [subprocess.Popen([sys.executable, str(script), redis_url, key_prefix, str(log),
                               tag], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for tag in ("a", "b")]
    for p in procs:  # both caches open before either asks
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    computed = [json.loads(line) for line in log.read_text().splitlines()]
    per_input = sorted(x for entry in computed for x in entry["inputs"])
    assert per_input == list(range(50)), computed  # every input once, in total
    answers = [json.loads(out.strip().splitlines()[-1]) for out in outs]
    for answer in answers:
        assert answer["outputs"] == [2.0 * n for n in range(50)]
    statuses = sorted(s for answer in answers for s in answer["statuses"])
    assert statuses.count("COMPUTED") == 50 and statuses.count("HIT_REDIS") == 50


def test_a_failing_compute_raises_and_gives_its_leases_back(
        cache: FeatureCache, redis_url: str, key_prefix: str, offline_url: str) -> None:
    ranker = cache.model("ranker", version="v1", lease_wait=30.0)

    def broken(batch: list[Any]) -> list[float]:
        raise RuntimeError("model crashed")

    with pytest.raises(RuntimeError, match="model crashed"):
        ranker.get_or_compute(inputs([1, 2]), compute=broken)
    # another process finds no lease to wait 30 s on: it computes at once
    with make_cache([VIEW], redis_url, offline_url, key_prefix) as other:
        model = Model()
        began = time.monotonic()
        result = other.model("ranker", version="v1", lease_wait=30.0).get_or_compute(
            inputs([1, 2]), compute=model)
        assert result.status_counts() == {Status.COMPUTED: 2}
        assert time.monotonic() - began < 20.0  # not the lease wait (a bound, not a speed)


def test_outputs_of_every_supported_type_round_trip(cache: FeatureCache) -> None:
    enc = cache.model("encoder", version="1")
    vec = np.arange(768, dtype=np.float32) / 7
    outputs = [0.25, 3, True, None, "label", [1, 2.5], {"p": 0.9, "top": [1, 2]},
               vec, np.float32(0.5), np.int64(4)]

    def compute(batch: list[Any]) -> list[Any]:
        return [outputs[x] for x in batch]

    enc.get_or_compute(list(range(len(outputs))), compute=compute)
    result = enc.get_or_compute(list(range(len(outputs))), compute=compute)
    assert result.status_counts() == {Status.HIT_REDIS: len(outputs)}
    got = list(result)
    assert got[:7] == outputs[:7]
    assert got[7].dtype == np.float32 and np.array_equal(got[7], vec)
    assert type(got[8]) is np.float32 and got[8] == 0.5
    assert type(got[9]) is np.int64 and got[9] == 4


def test_entity_ids_are_inputs_and_an_int_id_is_not_its_string(cache: FeatureCache) -> None:
    enc = cache.model("encoder", version="1")
    calls: list[list[Any]] = []

    def embed(ids: list[Any]) -> Any:
        calls.append(ids)
        return np.stack([np.full(4, hash(str(i)) % 97, dtype=np.float32) for i in ids])

    enc.get_or_compute([1, 2, 3], compute=embed)  # rows of a 2-D array are the outputs
    result = enc.get_or_compute([3, "3", 1], compute=embed)
    assert calls == [[1, 2, 3], ["3"]]
    assert result.statuses == [Status.HIT_REDIS, Status.COMPUTED, Status.HIT_REDIS]
    assert result[0].shape == (4,) and not result[0].flags.writeable


def test_bad_inputs_and_outputs_are_clear_errors_and_write_nothing(
        cache: FeatureCache, key_prefix: str) -> None:
    ranker = cache.model("ranker", version="v1")
    model = Model()
    with pytest.raises(InvalidRequest, match="set"):
        ranker.get_or_compute([{"x": {1, 2}}], compute=model)
    with pytest.raises(InvalidRequest, match="a dict is one input"):
        ranker.get_or_compute({"x": 1}, compute=model)
    with pytest.raises(InvalidRequest, match="callable"):
        ranker.get_or_compute(inputs([1]), compute="predict")  # type: ignore[arg-type]
    assert model.calls == []
    with pytest.raises(ModelOutputError, match="2 outputs for 3 inputs"):
        ranker.get_or_compute(inputs([1, 2, 3]), compute=lambda b: [0.0, 1.0])
    with pytest.raises(ModelOutputError, match=r"outputs\[1\]"):
        ranker.get_or_compute(inputs([1, 2]), compute=lambda b: [0.0, object()])
    assert ranker.stats()["written"] == 0
    with pytest.raises(InvalidRequest, match="model name"):
        cache.model("bad name", version="v1")
    with pytest.raises(InvalidRequest, match="model version"):
        cache.model("ranker", version="v1:2")
    with pytest.raises(InvalidRequest, match="ttl"):
        cache.model("ranker", version="v1", time_to_live=3)
    with pytest.raises(ConfigError, match=r"model\.ttl"):
        cache.model("ranker", version="v1", ttl=0)
    with pytest.raises(InvalidRequest, match="max_inputs"):
        cache.model("ranker", version="v1", max_inputs=2).get_or_compute(inputs([1, 2, 3]),
                                                                         compute=model)


def test_values_cut_short_among_hits_are_computed_again(
        cache: FeatureCache, redis_client: Any) -> None:
    """A batch whose other values are current outputs: one value cut inside the header's
    expiry and one holding a header and no output are misses, computed again in one call,
    and the rest are hits."""
    ranker = cache.model("ranker", version="v1")
    model = Model()
    batch = inputs(range(10))
    ranker.get_or_compute(batch, compute=model)
    keys = ranker.keys_of(batch)
    whole = redis_client.get(keys[3])
    redis_client.set(keys[3], whole[:12])
    redis_client.set(keys[6], whole[:22])
    model.calls.clear()
    result = ranker.get_or_compute(batch, compute=model)
    assert model.calls == [[batch[3], batch[6]]]
    assert result.statuses == [Status.COMPUTED if i in (3, 6) else Status.HIT_REDIS
                               for i in range(10)]
    assert list(result) == [2.0 * i for i in range(10)]
    assert ranker.stats()["decode_errors"] == 2


def test_outputs_expire_after_the_ttl_on_the_injected_clock(
        redis_url: str, key_prefix: str, offline_url: str) -> None:
    clock = Clock(time.time())
    with make_cache([VIEW], redis_url, offline_url, key_prefix, clock) as made:
        ranker = made.model("ranker", version="v1", ttl=60.0)
        model = Model()
        ranker.get_or_compute(inputs([1]), compute=model)
        clock.advance(59.0)
        assert ranker.get_or_compute(inputs([1]), compute=model).statuses == [Status.HIT_REDIS]
        clock.advance(2.0)
        assert ranker.get_or_compute(inputs([1]), compute=model).statuses == [Status.COMPUTED]


def test_early_refresh_recomputes_a_hot_input_before_it_expires(
        redis_url: str, key_prefix: str, offline_url: str) -> None:
    clock = Clock(time.time())
    with make_cache([VIEW], redis_url, offline_url, key_prefix, clock) as made:
        hot = made.model("ranker", version="v1", ttl=60.0, early_refresh=1e9)
        cold = made.model("ranker", version="v1", ttl=60.0)
        slow = Model(delay=0.01)  # XFetch's delta: how long its compute took
        hot.get_or_compute(inputs([1]), compute=slow)
        assert cold.get_or_compute(inputs([1]), compute=slow).statuses == [Status.HIT_REDIS]
        clock.advance(30.0)
        result = hot.get_or_compute(inputs([1]), compute=Model(bias=1.0))
        assert result.statuses == [Status.COMPUTED] and list(result) == [3.0]
        assert hot.stats()["refreshed"] == 1
        # the refreshed output replaced the old one in Redis, with a new expiry
        clock.advance(50.0)
        assert cold.get_or_compute(inputs([1]), compute=slow).statuses == [Status.HIT_REDIS]
        assert list(cold.get_or_compute(inputs([1]), compute=slow)) == [3.0]


def test_redis_down_computes_everything_and_raises_nothing(offline_url: str) -> None:
    config = CacheConfig(views=(VIEW,), redis=RedisConfig(url="redis://127.0.0.1:1/0"),
                         offline_store=OfflineStoreConfig(url=offline_url))
    with FeatureCache(config) as made:
        ranker = made.model("ranker", version="v1")
        model = Model()
        result = ranker.get_or_compute(inputs([1, 2]), compute=model)
        assert list(result) == [2.0, 4.0]
        assert result.status_counts() == {Status.COMPUTED: 2}
        assert ranker.stats()["redis_errors"] >= 1


def _sync(model: Any) -> Any:
    """The ``ModelCache`` behind a test's model (the async client's adapter holds one)."""
    return model.async_model.sync if hasattr(model, "async_model") else model


def test_the_async_client_awaits_a_coroutine_compute_once_for_concurrent_requests(
        redis_url: str, key_prefix: str, offline_url: str) -> None:
    config = CacheConfig(views=(VIEW,), redis=redis_config(redis_url, key_prefix),
                         offline_store=OfflineStoreConfig(url=offline_url))
    calls: list[list[Any]] = []

    async def remote_model(batch: list[Any]) -> list[float]:  # a model server, awaited
        calls.append(batch)
        await asyncio.sleep(0.2)
        return [2.0 * x["x"] for x in batch]

    async def main() -> list[Any]:
        async with AsyncFeatureCache(config) as cache:
            ranker = cache.model("ranker", version="async")
            asked = [ranker.get_or_compute(inputs(range(10)), compute=remote_model)
                     for _ in range(5)]
            first = await asyncio.gather(*asked)
            again = await ranker.get_or_compute(inputs(range(10)), compute=remote_model)
            return [*first, again]

    results = asyncio.run(main())
    assert sorted(x["x"] for batch in calls for x in batch) == list(range(10))
    assert all(list(r) == [2.0 * n for n in range(10)] for r in results)
    assert results[-1].status_counts() == {Status.HIT_REDIS: 10}


def test_async_callers_waiting_on_a_shared_compute_hold_no_pool_thread(
        redis_url: str, key_prefix: str, offline_url: str) -> None:
    """With two threads, 20 coroutines wait for one input's held compute on the event loop,
    and another input is computed on the free thread meanwhile."""
    config = CacheConfig(views=(VIEW,), redis=redis_config(redis_url, key_prefix),
                         offline_store=OfflineStoreConfig(url=offline_url))
    calls: list[list[Any]] = []

    async def main() -> tuple[list[Any], Any]:
        release = asyncio.Event()

        async def held_model(batch: list[Any]) -> list[float]:
            calls.append(batch)
            await release.wait()
            return [2.0 * x["x"] for x in batch]

        async with AsyncFeatureCache(config, fill_threads=2) as cache:
            ranker = cache.model("ranker", version="held")
            asked = [asyncio.ensure_future(ranker.get_or_compute(inputs([1]), held_model))
                     for _ in range(20)]
            flights = cache.sync._models.flights
            await asyncio.wait_for(_until_async(lambda: flights.joined >= 19), 30.0)
            other = await asyncio.wait_for(
                ranker.get_or_compute(inputs([2]), Model()), 10.0)
            assert not any(a.done() for a in asked)  # all still waiting on the held compute
            release.set()
            return await asyncio.gather(*asked), other

    held, other = asyncio.run(main())
    assert calls == [inputs([1])]  # computed once for the 20 callers
    assert [list(r) for r in held] == [[2.0]] * 20
    assert list(other) == [4.0] and other.status_counts() == {Status.COMPUTED: 1}


async def _until_async(condition: Any) -> None:
    while not condition():
        await asyncio.sleep(0.005)


def test_threads_that_share_one_compute_get_their_own_outputs(cache: FeatureCache) -> None:
    enc = cache.model("encoder", version="shared")
    start = threading.Barrier(4)
    results: list[Any] = []

    def slow(batch: list[Any]) -> list[Any]:
        time.sleep(0.3)  # the other threads join this compute meanwhile
        return [{"tags": ["a", "b"]} for _ in batch]

    def ask() -> None:
        start.wait()
        results.append(enc.get_or_compute([{"x": 1}], compute=slow))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert enc.stats()["compute_calls"] == 1
    results[0][0]["tags"].append("mine")  # one caller's change reaches no other caller
    assert [r[0] for r in results[1:]] == [{"tags": ["a", "b"]}] * 3
