"""``featcache serve`` as a client sees it: a real server process on a free port, a real HTTP
client (httpx), real Redis and SQL.

Every endpoint and every error with its status code; the values equal to ``get_features`` on
the same config; Feast's request built and its response parsed as Feast's remote online store
does (``feast/infra/online_stores/remote.py``: the JSON posted as a raw body, the response read
by ``metadata.feature_names``, ``results[i].statuses[j] == "PRESENT"`` and ``values``, the
event time from ``results[1].event_timestamps[0]``); 64 concurrent clients for 10 s; SQL down;
SIGTERM with requests in flight.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pytest
from featdata import STATS_FEATURES, insert, make_table, redis_yaml, stats_row
from servers import SqlTarget
from sqloutage import sql_outage

from featcache import FeatureCache, Status, load_config
from featcache.embedded import free_port

NAMES = ["ctr", "clicks", "country", "vip", "last_seen", "emb"]
FEAST_FEATURES = [f"stats:{name}" for name in NAMES]
TOKEN = "s3cret-token"
START_S = 60.0
IDS = range(1, 201)


def config_yaml(redis_url: str, key_prefix: str, sql_url: str, **serve: Any) -> str:
    features = "\n".join(f"      {f.name}: {{type: '{f.type.value}', max_age: 1h}}"
                         for f in STATS_FEATURES)
    limits = ", ".join(f"{k}: {v}" for k, v in {"max_ids": 100, "max_body": 4096,
                                                 "drain_timeout": "20s", **serve}.items())
    return (
        redis_yaml(redis_url, key_prefix)
        + f"offline_store: {{url: '{sql_url}'}}\n"
        + f"serve: {{{limits}}}\n"
        + "stats: {publish_interval: 0}\n"
        + "views:\n  stats:\n    table: user_stats\n"
        + "    entity: {column: entity_id, type: int}\n    event_timestamp: event_ts\n"
        + "    features:\n" + features + "\n"
    )


@dataclass
class Served:
    url: str
    proc: subprocess.Popen[bytes]
    config: Path
    log: Path

    def client(self, token: str | None = TOKEN, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kwargs)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def serving(tmp: Path, config_text: str, *, workers: int = 1,
            token: str | None = TOKEN) -> Iterator[Served]:
    tmp.mkdir(parents=True, exist_ok=True)
    config = tmp / "featcache.yaml"
    config.write_text(config_text)
    port = free_port()
    log = tmp / "serve.log"
    env = {**os.environ}
    env.pop("FEATCACHE_SERVE_TOKEN", None)
    if token:
        env["FEATCACHE_SERVE_TOKEN"] = token
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "featcache.jobs.cli", "serve", "--config", str(config),
             "--port", str(port), "--workers", str(workers)],
            stdout=out, stderr=subprocess.STDOUT, env=env)
    served = Served(f"http://127.0.0.1:{port}", proc, config, log)
    try:
        deadline = time.monotonic() + START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"featcache serve exited {proc.returncode}:\n{served.output()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{served.url}/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"featcache serve not ready in {START_S:.0f} s:\n{served.output()}")
            time.sleep(0.1)
        yield served
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def table_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("serve-sql") / "offline.db"
    url = f"sqlite:///{path}"
    import sqlalchemy as sa  # noqa: PLC0415

    engine = sa.create_engine(url)
    table = make_table(engine, None, "user_stats", STATS_FEATURES)
    insert(engine, table, [stats_row(i, clicks=i, ctr=i / 1000) for i in IDS])
    engine.dispose()
    return url


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, redis_url: str, table_url: str
           ) -> Iterator[Served]:
    prefix = f"fcserve-{os.getpid()}-{time.monotonic_ns() % 10**8}"
    with serving(tmp_path_factory.mktemp("serve"), config_yaml(redis_url, prefix, table_url)
                 ) as served:
        yield served


@pytest.fixture(scope="module")
def reference(server: Served) -> Iterator[FeatureCache]:
    """A FeatureCache on the server's own config: what ``get_features`` answers."""
    with FeatureCache(load_config(server.config)) as cache:
        yield cache


# ------------------------------------------------------------------------------ endpoints


def test_health_and_readiness(server: Served) -> None:
    with server.client(token=None) as client:  # probes need no token
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json() == {"ready": True, "redis": "ok", "sql": "ok"}


def test_own_api_json_equals_get_features(server: Served, reference: FeatureCache) -> None:
    ids = [3, 1, 999, 2]
    with server.client() as client:
        first = client.post("/v1/features", json={"ids": ids, "features": NAMES})
        second = client.post("/v1/features", json={"ids": ids, "features": NAMES})
    assert first.status_code == second.status_code == 200
    body = second.json()
    expected = reference.get_features(ids, NAMES)
    assert body["ids"] == ids
    rows = body["views"]["stats"]
    assert rows["statuses"] == [expected.status(i, "clicks").value for i in ids]
    stamps = [None if t is None else dt.datetime.fromisoformat(t)
              for t in rows["event_timestamps"]]
    assert stamps == [expected.event_timestamp(i, "clicks") for i in ids]
    present = [3, 1, 2]  # every row found: the event times take the batch path
    with server.client() as client:
        hits = client.post("/v1/features", json={"ids": present, "features": NAMES}).json()
    times = hits["views"]["stats"]["event_timestamps"]
    assert all(t.endswith("Z") for t in times), times
    assert [dt.datetime.fromisoformat(t) for t in times] == [
        expected.event_timestamp(i, "clicks") for i in present]
    assert hits["views"]["stats"]["statuses"] == ["HIT_REDIS"] * len(present)
    assert {name: hits["features"][name]["values"] for name in NAMES} == {
        name: body["features"][name]["values"][:2] + body["features"][name]["values"][3:]
        for name in NAMES}
    for name in NAMES:
        column = body["features"][name]
        assert column["view"] == "stats"
        for i, value in zip(ids, column["values"], strict=True):
            want = expected[i][name]
            if isinstance(want, dt.datetime):
                assert dt.datetime.fromisoformat(value) == want
            else:
                assert value == want
    assert body["features"]["clicks"]["type"] == "int"
    assert first.json()["views"]["stats"]["statuses"][2] == "ABSENT"


def test_own_api_arrow_when_asked(server: Served, reference: FeatureCache) -> None:
    ids = [5, 6, 7]
    with server.client() as client:
        response = client.post("/v1/features", json={"ids": ids, "features": NAMES},
                               headers={"Accept": "application/vnd.apache.arrow.stream"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/vnd.apache.arrow.stream")
    table = pa.ipc.open_stream(response.content).read_all()
    expected = reference.get_features(ids, NAMES).to_arrow()
    assert table.column("entity_id").to_pylist() == ids
    for name in NAMES:
        assert table.column(name).to_pylist() == expected.column(name).to_pylist()
    assert set(table.column("clicks.status").to_pylist()) <= {"HIT_REDIS", "FILLED"}


def feast_request_body(ids: list[int], features: list[str]) -> str:
    """The body Feast's remote online store sends (``_construct_online_read_api_json_request``):
    ``json.dumps`` of features and entities, posted as raw data with no content type."""
    return json.dumps({"features": features, "entities": {"entity_id": ids}})


def test_a_feast_client_request_is_answered_in_the_shape_it_parses(
    server: Served, reference: FeatureCache
) -> None:
    ids = [10, 11, 9999]
    with server.client() as client:
        response = client.post("/get-online-features",
                               content=feast_request_body(ids, FEAST_FEATURES))
    assert response.status_code == 200
    body = json.loads(response.text)
    # parsed as remote.py parses it
    names = body["metadata"]["feature_names"]
    assert names == ["entity_id", *NAMES]
    event_ts = dt.datetime.fromisoformat(
        body["results"][1]["event_timestamps"][0].replace("Z", "+00:00"))
    expected = reference.get_features(ids, NAMES)
    assert event_ts == expected.event_timestamp(10, "ctr")
    for row, entity in enumerate(ids):
        for index, name in enumerate(names):
            if name not in NAMES:
                continue
            vector = body["results"][index]
            if vector["statuses"][row] == "PRESENT":
                value = vector["values"][row]
                want = expected[entity][name]
                if isinstance(want, dt.datetime):
                    want = want.isoformat().replace("+00:00", "Z")
                assert value == want, (entity, name)
            else:
                assert entity == 9999
                assert vector["statuses"][row] == "NOT_FOUND"
                assert vector["values"][row] is None
                assert vector["featcache_statuses"][row] == "ABSENT"
    # the join key comes first, as given
    assert body["results"][0]["values"] == ids
    assert body["results"][0]["statuses"] == ["PRESENT"] * 3
    # every row found: the event times take the batch path, and are the same strings
    with server.client() as client:
        found = client.post("/get-online-features",
                            content=feast_request_body(ids[:2], FEAST_FEATURES)).json()
    for vector in found["results"][1:]:
        assert vector["statuses"] == ["PRESENT", "PRESENT"]
        assert vector["event_timestamps"] == [
            expected.event_timestamp(entity, "ctr").isoformat().replace("+00:00", "Z")
            for entity in ids[:2]]


def test_feast_full_feature_names_duplicates_and_statuses(server: Served) -> None:
    with server.client() as client:
        body = client.post("/get-online-features", json={
            "features": ["stats:clicks"], "entities": {"entity_id": [12, 12, 13]},
            "full_feature_names": True}).json()
    assert body["metadata"]["feature_names"] == ["entity_id", "stats__clicks"]
    assert body["results"][1]["values"] == [12, 12, 13]
    assert set(body["results"][1]["featcache_statuses"]) <= {"HIT_REDIS", "FILLED"}


def test_invalidate_over_http(server: Served, reference: FeatureCache) -> None:
    with server.client() as client:
        client.post("/v1/features", json={"ids": [20], "features": ["clicks"]})
        hit = client.post("/v1/features", json={"ids": [20], "features": ["clicks"]}).json()
        assert hit["views"]["stats"]["statuses"] == ["HIT_REDIS"]
        report = client.post("/v1/invalidate", json={"view": "stats", "ids": [20]})
        assert report.status_code == 200
        assert report.json()["entities"] == 1 and report.json()["view"] == "stats"
        again = client.post("/v1/features", json={"ids": [20], "features": ["clicks"]}).json()
        assert again["views"]["stats"]["statuses"] == ["FILLED"]
        whole = client.post("/v1/invalidate", json={"view": "stats"}).json()
        assert whole["whole_view"] is True


def test_metrics(server: Served) -> None:
    with server.client() as client:
        client.post("/v1/features", json={"ids": [1], "features": ["clicks"]})
        text = client.get("/metrics").text
    assert "featcache_" in text and 'view="stats"' in text


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(("path", "body", "status", "kind", "message"), [
    ("/v1/features", b"{not json", 400, "InvalidRequest", "not JSON"),
    ("/v1/features", b'["a list"]', 400, "InvalidRequest", "JSON object"),
    ("/v1/features", b'{"ids": [1], "features": ["nope"]}', 400, "UnknownFeature", "nope"),
    ("/v1/features", b'{"ids": ["x"], "features": ["clicks"]}', 400, "InvalidEntityId", "x"),
    ("/v1/features", b'{"ids": [1], "features": ["clicks"], "extra": 1}', 400,
     "InvalidRequest", "extra"),
    ("/get-online-features", b'{"features": ["nope:clicks"], "entities": {"entity_id": [1]}}',
     400, "UnknownView", "nope"),
    ("/get-online-features", b'{"features": ["stats:clicks"], "entities": {"user": [1]}}',
     400, "InvalidRequest", "join key"),
    ("/get-online-features", b'{"feature_service": "svc", "entities": {"entity_id": [1]}}',
     400, "InvalidRequest", "feature services"),
    ("/v1/invalidate", b'{"view": "nope", "ids": [1]}', 400, "UnknownView", "nope"),
    ("/v1/features", json.dumps({"ids": list(range(101)), "features": ["clicks"]}).encode(),
     413, "TooLarge", "serve.max_ids"),
    ("/v1/features", b'{"ids": [' + b"1," * 3000 + b'1], "features": ["clicks"]}', 413,
     "TooLarge", "serve.max_body"),
])
def test_errors_have_their_status_and_featcaches_message(
    server: Served, path: str, body: bytes, status: int, kind: str, message: str
) -> None:
    with server.client() as client:
        response = client.post(path, content=body)
    assert response.status_code == status, response.text
    assert response.json()["type"] == kind
    assert message in response.json()["error"]
    assert "Traceback" not in response.text


def test_a_body_without_length_is_still_limited(server: Served) -> None:
    def chunks() -> Iterator[bytes]:  # chunked transfer: no Content-Length to check first
        yield b'{"ids": ['
        for _ in range(2000):
            yield b"1,"
        yield b'1], "features": ["clicks"]}'

    with server.client() as client:
        response = client.post("/v1/features", content=chunks())
    assert response.status_code == 413


@pytest.mark.parametrize("token", [None, "wrong"])
def test_the_token_is_required(server: Served, token: str | None) -> None:
    with server.client(token=token) as client:
        for method, path in (("POST", "/v1/features"), ("POST", "/get-online-features"),
                             ("POST", "/v1/invalidate"), ("GET", "/metrics")):
            response = client.request(method, path, json={"ids": [1], "features": ["clicks"]})
            assert response.status_code == 401, (path, response.text)
            assert response.headers["www-authenticate"] == "Bearer"


def test_unknown_routes_and_methods(server: Served) -> None:
    with server.client() as client:
        assert client.get("/nope").status_code == 404
        assert client.get("/v1/features").status_code == 405


# ------------------------------------------------------------------------------ load


def test_64_concurrent_clients_for_10_s_have_no_errors_and_right_values(
    server: Served, reference: FeatureCache
) -> None:
    expected = reference.get_features(list(IDS), ["clicks", "country"])
    stop = time.monotonic() + 10.0
    errors: list[str] = []
    counts: list[int] = []

    def client_loop(seed: int) -> None:
        done = 0
        with server.client() as client:
            step = 0
            while time.monotonic() < stop:
                ids = [1 + (seed * 7 + step * 13 + k) % len(IDS) for k in range(10)]
                step += 1
                response = client.post("/v1/features",
                                       json={"ids": ids, "features": ["clicks", "country"]})
                if response.status_code != 200:
                    errors.append(f"{response.status_code}: {response.text[:200]}")
                    continue
                body = response.json()
                clicks = body["features"]["clicks"]["values"]
                want = [expected[i]["clicks"] for i in dict.fromkeys(ids)]
                if clicks != want:
                    errors.append(f"values {clicks} != {want}")
                done += 1
        counts.append(done)

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        list(pool.map(client_loop, range(64)))
    assert errors == [], errors[:5]
    assert len(counts) == 64 and min(counts) > 0
    assert sum(counts) > 64


# ------------------------------------------------------------------------------ outages


@pytest.fixture
def postgres_target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlTarget]:
    from servers import isolated_target, unavailable  # noqa: PLC0415

    base: str | None = request.getfixturevalue("pg_base_url")
    if base is None:  # a skip, or a failure where postgresql is required
        unavailable("postgresql", "FEATCACHE_TEST_PG_URL is unset and no initdb/postgres "
                                  "was found")
    with isolated_target("postgresql", base, tmp_path) as target:
        yield target


def test_sql_down_is_503_with_what_could_be_served(
    postgres_target: SqlTarget, redis_url: str, tmp_path: Path
) -> None:
    table = make_table(postgres_target.engine(), postgres_target.schema, "user_stats",
                       STATS_FEATURES)
    insert(postgres_target.engine(), table, [stats_row(i, clicks=i) for i in range(1, 11)])
    with sql_outage(postgres_target) as outage:
        url = outage.url + (f"?options=-csearch_path%3D{postgres_target.schema}"
                            if postgres_target.schema else "")
        prefix = f"fcserve-down-{os.getpid()}"
        with serving(tmp_path, config_yaml(redis_url, prefix, url)) as served, \
                served.client() as client:
            warm = client.post("/v1/features", json={"ids": [1, 2], "features": ["clicks"]})
            assert warm.status_code == 200
            outage.down()
            assert outage.is_down()
            response = client.post("/v1/features",
                                   json={"ids": [1, 2, 3], "features": ["clicks"]})
            assert response.status_code == 503, response.text
            body = response.json()
            assert body["views"]["stats"]["statuses"] == ["HIT_REDIS", "HIT_REDIS",
                                                           "UNAVAILABLE"]
            assert body["features"]["clicks"]["values"] == [1, 2, None]
            ready = client.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["redis"] == "ok" and ready.json()["sql"] != "ok"
            outage.up()
            assert client.post("/v1/features",
                               json={"ids": [3], "features": ["clicks"]}).status_code == 200


def test_sigterm_drains_requests_in_flight_then_stops(
    redis_url: str, tmp_path: Path
) -> None:
    """A request waiting on SQL (the test holds SQLite's write lock) when SIGTERM arrives is
    answered in full; then the server exits 0 and accepts nothing more."""
    path = tmp_path / "offline.db"
    import sqlalchemy as sa  # noqa: PLC0415

    engine = sa.create_engine(f"sqlite:///{path}")
    insert(engine, make_table(engine, None, "user_stats", STATS_FEATURES),
           [stats_row(i, clicks=i) for i in range(1, 11)])
    engine.dispose()
    prefix = f"fcserve-term-{os.getpid()}"
    with serving(tmp_path / "srv", config_yaml(redis_url, prefix, f"sqlite:///{path}")
                 ) as served:
        lock = sqlite3.connect(path, timeout=1)
        lock.execute("BEGIN EXCLUSIVE")  # every read waits (SQLite's busy timeout: 5 s)
        answers: list[httpx.Response] = []
        request = threading.Thread(target=lambda: answers.append(served.client().post(
            "/v1/features", json={"ids": [4], "features": ["clicks"]})))
        request.start()
        time.sleep(0.5)  # the request is in the server, waiting on SQL
        served.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        lock.rollback()
        lock.close()
        request.join(30)
        assert served.proc.wait(30) == 0, served.output()
        assert answers and answers[0].status_code == 200, answers
        assert answers[0].json()["features"]["clicks"]["values"] == [4]
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{served.url}/healthz", timeout=2)


def test_workers_each_serve(redis_url: str, table_url: str, tmp_path: Path) -> None:
    prefix = f"fcserve-workers-{os.getpid()}"
    with serving(tmp_path, config_yaml(redis_url, prefix, table_url), workers=2) as served, \
            served.client() as client:
        seen: set[str] = set()
        for _ in range(20):
            response = client.post("/v1/features", json={"ids": [1, 2], "features": ["clicks"]})
            assert response.status_code == 200
            assert response.json()["features"]["clicks"]["values"] == [1, 2]
            seen.update(response.json()["views"]["stats"]["statuses"])
    assert seen <= {Status.HIT_REDIS.value, Status.FILLED.value}
