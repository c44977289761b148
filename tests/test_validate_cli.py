"""``featcache validate`` against real servers with each fault planted: a wrong Redis password
(a private Valkey started with ``requirepass``), a missing column, no index on the entity
column, ``maxmemory-policy noeviction``, an unreachable Redis, and a clean pass; on one server,
on the private cluster (each primary reported) and Sentinel set (the primary it names)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
import yaml
from clienv import closed_port, featcache, write_config
from featdata import STATS_FEATURES, insert, make_table, stats_row
from servers import SqlTarget, unavailable

from featcache.embedded import EmbeddedServer
from featcache.embedded_cluster import EmbeddedCluster
from featcache.embedded_sentinel import EmbeddedSentinel
from featcache.errors import EmbeddedServerError

EX_TEMPFAIL, EX_CONFIG = 75, 78
#: what a deployment should run: a limit, and a policy that evicts
SOUND = ("--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lfu")


@contextlib.contextmanager
def _private(*args: str) -> Iterator[EmbeddedServer]:
    """A private Valkey of its own: these tests change its settings."""
    try:
        server = EmbeddedServer(extra_args=args)
    except EmbeddedServerError as exc:
        unavailable("redis", str(exc))
    with server:
        yield server


@pytest.fixture(scope="module")
def sound_server() -> Iterator[EmbeddedServer]:
    with _private(*SOUND) as server:
        yield server


@pytest.fixture(scope="module")
def password_server() -> Iterator[EmbeddedServer]:
    with _private(*SOUND, "--requirepass", "s3cret") as server:
        yield server


def _table(target: SqlTarget, *, indexed: bool, features: Any = STATS_FEATURES) -> None:
    engine = target.engine()
    table = make_table(engine, target.schema, "cv", features)
    insert(engine, table, [stats_row(i) for i in range(1, 6)])
    if indexed:
        sa.Index("ix_cv_entity", table.c.entity_id, table.c.event_ts).create(engine)


def _config(tmp_path: Path, redis_url: str, target: SqlTarget, prefix: str = "fcv") -> Path:
    return write_config(tmp_path / "featcache.yaml", redis_url, prefix, target.url,
                        schema=target.schema)


def _json(done: Any) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def _failed(done: Any, status: int, message: str) -> None:
    """The report on stdout; one error line on stderr, of the decisive error's status."""
    assert done.returncode == status, (done.returncode, done.stdout, done.stderr)
    assert done.stderr.startswith("featcache: error: ") and done.stderr.count("\n") == 1, \
        done.stderr
    assert message in done.stderr and message in done.stdout, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr


# ---------------------------------------------------------------------------- a clean pass


def test_a_sound_deployment_passes(sound_server: EmbeddedServer, sqlite_target: SqlTarget,
                                   tmp_path: Path) -> None:
    _table(sqlite_target, indexed=True)
    path = _config(tmp_path, sound_server.url, sqlite_target)
    done = featcache("validate", "--config", str(path))
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    text = done.stdout
    assert text.endswith("0 errors, 0 warnings\n"), text
    assert f"redis: standalone {sound_server.url}" in text
    assert "maxmemory 64.0 MiB, maxmemory-policy allkeys-lfu" in text
    assert "view cv: lookup by 'entity_id': SEARCH cv USING COVERING INDEX ix_cv_entity" in text
    assert "view cv: 5 row(s) read and converted" in text

    done = featcache("validate", "--config", str(path), "--json")
    assert done.returncode == 0, done.stderr
    report = _json(done)
    assert (report["ok"], report["errors"], report["warnings"]) == (True, 0, 0)
    (node,) = report["redis"]["nodes"]
    assert (node["maxmemory"], node["maxmemory_policy"]) == (64 * 1024 * 1024, "allkeys-lfu")
    assert node["role"] in ("master", "primary")
    assert node["server"] in ("valkey", "redis") and node["version"]
    assert [v["view"] for v in report["views"]] == ["cv"]


# ---------------------------------------------------------------------------- Redis faults


def test_a_wrong_redis_password_exits_78(password_server: EmbeddedServer,
                                         sqlite_target: SqlTarget, tmp_path: Path) -> None:
    _table(sqlite_target, indexed=True)
    wrong = password_server.url.replace("redis://", "redis://:wr0ngpass@")
    done = featcache("validate", "--config", str(_config(tmp_path, wrong, sqlite_target)))
    _failed(done, EX_CONFIG, "refused the configured access")
    assert "wr0ngpass" not in done.stdout + done.stderr
    assert "1 error, 0 warnings" in done.stdout  # SQL was still checked, and passed
    # no password at all: the same error (NOAUTH)
    done = featcache("validate", "--config",
                     str(_config(tmp_path, password_server.url, sqlite_target)))
    _failed(done, EX_CONFIG, "refused the configured access")
    # the right one passes
    right = password_server.url.replace("redis://", "redis://:s3cret@")
    done = featcache("validate", "--config", str(_config(tmp_path, right, sqlite_target)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "s3cret" not in done.stdout


def test_noeviction_and_no_maxmemory_are_warnings(sqlite_target: SqlTarget,
                                                  tmp_path: Path) -> None:
    _table(sqlite_target, indexed=True)
    with _private(*SOUND) as server:
        path = _config(tmp_path, server.url, sqlite_target)
        client = redis.Redis.from_url(server.url)
        try:
            client.config_set("maxmemory-policy", "noeviction")
            done = featcache("validate", "--config", str(path))
            assert (done.returncode, done.stderr) == (0, ""), done.stdout + done.stderr
            assert f"  warning  {server.url}: maxmemory-policy is noeviction: once maxmemory " \
                   "is reached every write fails" in done.stdout
            assert done.stdout.endswith("0 errors, 1 warning\n"), done.stdout
            strict = featcache("validate", "--config", str(path), "--strict")
            assert strict.returncode == 78, strict.stdout + strict.stderr
            assert "1 warning with --strict" in strict.stderr
            assert "maxmemory-policy is noeviction" in strict.stderr
            client.config_set("maxmemory", 0)
            report = _json(featcache("validate", "--config", str(path), "--json"))
            assert (report["ok"], report["warnings"]) == (True, 2)
            messages = [f["message"] for f in report["findings"] if f["level"] == "warning"]
            assert any(m.startswith("maxmemory is 0 (no limit)") for m in messages), messages
        finally:
            client.close()


def test_an_unreachable_redis_exits_75_and_a_config_error_wins(
    sqlite_target: SqlTarget, tmp_path: Path
) -> None:
    _table(sqlite_target, indexed=True)
    down = f"redis://127.0.0.1:{closed_port()}/0"
    done = featcache("validate", "--config", str(_config(tmp_path, down, sqlite_target)))
    _failed(done, EX_TEMPFAIL, "127.0.0.1")
    # the same, with a column missing too: retrying cannot fix that, so 78
    with sqlite_target.engine().begin() as conn:
        conn.execute(sa.text("ALTER TABLE cv DROP COLUMN clicks"))
    done = featcache("validate", "--config", str(_config(tmp_path, down, sqlite_target)))
    _failed(done, EX_CONFIG, "column 'clicks' does not exist in table 'cv'")
    assert done.stderr.startswith("featcache: error: 2 checks failed (the report lists them): "
                                  f"{tmp_path / 'featcache.yaml'}: views.cv.features.clicks: "
                                  ), done.stderr


# ---------------------------------------------------------------------------- SQL faults


def test_a_missing_column_exits_78_and_every_one_is_named(
    sound_server: EmbeddedServer, sqlite_target: SqlTarget, tmp_path: Path
) -> None:
    kept = [f for f in STATS_FEATURES if f.name not in ("ctr", "clicks")]
    engine = sqlite_target.engine()
    table = make_table(engine, None, "cv", kept)
    insert(engine, table, [{k: v for k, v in stats_row(1).items() if k not in ("ctr", "clicks")}])
    path = _config(tmp_path, sound_server.url, sqlite_target)
    done = featcache("validate", "--config", str(path))
    # in the file's order (write_config sorts the features' names)
    _failed(done, EX_CONFIG,
            "views.cv.features.clicks: column 'clicks' does not exist in table 'cv'")
    assert "views.cv.features.ctr: column 'ctr' does not exist in table 'cv'; did you mean " \
           "'country'?" in done.stdout
    assert "2 errors, 1 warning" in done.stdout  # and no index
    report = _json(featcache("validate", "--config", str(path), "--json"))
    paths = [f.get("path") for f in report["findings"] if f["level"] == "error"]
    assert paths == ["views.cv.features.clicks", "views.cv.features.ctr"], report["findings"]


def test_a_missing_table_and_a_value_of_another_type(
    sound_server: EmbeddedServer, sqlite_target: SqlTarget, tmp_path: Path
) -> None:
    path = _config(tmp_path, sound_server.url, sqlite_target)
    done = featcache("validate", "--config", str(path))
    _failed(done, EX_CONFIG, "table 'cv' does not exist")
    # clicks declared int, the column holds text: a warning for the type, an error for the
    # value a read could not convert
    with sqlite_target.engine().begin() as conn:
        conn.execute(sa.text("CREATE TABLE cv (entity_id INTEGER PRIMARY KEY, "
                             "event_ts DATETIME, ctr FLOAT, clicks TEXT)"))
        conn.execute(sa.text("INSERT INTO cv VALUES (1, '2026-01-01 00:00:00', 0.5, 'many')"))
    done = featcache("validate", "--config", str(path))
    _failed(done, EX_CONFIG, "column 'clicks' holds a value that is not int")
    assert "views.cv.features.clicks.type: column 'clicks' is TEXT in the database, " \
           "declared int" in done.stdout
    assert "lookup by 'entity_id': SEARCH cv USING INTEGER PRIMARY KEY" in done.stdout


@pytest.mark.parametrize("sql_target", ["sqlite", "postgresql"], indirect=True)
def test_no_index_on_the_entity_column_is_a_warning(
    sound_server: EmbeddedServer, sql_target: SqlTarget, tmp_path: Path
) -> None:
    _table(sql_target, indexed=False)
    path = _config(tmp_path, sound_server.url, sql_target)
    done = featcache("validate", "--config", str(path))
    assert (done.returncode, done.stderr) == (0, ""), done.stdout + done.stderr
    assert "warning  view cv: views.cv.entity.column: no index on 'entity_id'" in done.stdout
    assert "every read of the view scans the table" in done.stdout
    assert done.stdout.endswith("0 errors, 1 warning\n"), done.stdout
    strict = featcache("validate", "--config", str(path), "--strict")
    assert strict.returncode == 78 and "no index on 'entity_id'" in strict.stderr, strict.stderr
    # an index whose first column is another one does not serve a lookup by id
    engine = sql_target.engine()
    table = sa.Table("cv", sa.MetaData(schema=sql_target.schema), autoload_with=engine)
    sa.Index("ix_cv_event", table.c.event_ts, table.c.entity_id).create(engine)
    assert "no index on 'entity_id'" in featcache("validate", "--config", str(path)).stdout
    sa.Index("ix_cv_entity", table.c.entity_id).create(engine)
    done = featcache("validate", "--config", str(path))
    assert done.stdout.endswith("0 errors, 0 warnings\n"), done.stdout
    assert "ix_cv_entity" in done.stdout


@pytest.mark.parametrize("sql_target", ["postgresql"], indirect=True)
def test_a_postgresql_view_is_judged_by_its_plan(
    sound_server: EmbeddedServer, sql_target: SqlTarget, tmp_path: Path
) -> None:
    engine = sql_target.engine()
    table = make_table(engine, sql_target.schema, "cv_base", STATS_FEATURES)
    insert(engine, table, [stats_row(i) for i in range(1, 6)])
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE VIEW "{sql_target.schema}".cv AS '
                             f'SELECT * FROM "{sql_target.schema}".cv_base'))
    path = _config(tmp_path, sound_server.url, sql_target)
    done = featcache("validate", "--config", str(path))
    assert (done.returncode, done.stderr) == (0, ""), done.stdout + done.stderr
    assert "no index on 'entity_id'" in done.stdout and "Seq Scan on cv_base" in done.stdout
    sa.Index("ix_cv_base_entity", table.c.entity_id).create(engine)
    done = featcache("validate", "--config", str(path))
    assert done.stdout.endswith("0 errors, 0 warnings\n"), done.stdout
    assert "ix_cv_base_entity" in done.stdout


# ---------------------------------------------------------------------------- cluster


def test_a_cluster_reports_each_primary(redis_cluster: EmbeddedCluster,
                                        cluster_key_prefix: str, sqlite_target: SqlTarget,
                                        tmp_path: Path) -> None:
    _table(sqlite_target, indexed=True)
    path = write_config(tmp_path / "c.yaml", f"redis://{redis_cluster.seeds[0]}/0",
                        cluster_key_prefix, sqlite_target.url)
    settings = yaml.safe_load(path.read_text())
    settings["redis"]["mode"] = "cluster"
    path.write_text(yaml.safe_dump(settings))
    report = _json(featcache("validate", "--config", str(path), "--json"))
    assert report["errors"] == 0, report["findings"]
    nodes = report["redis"]["nodes"]
    assert sorted(n["address"] for n in nodes) == sorted(
        p.address for p in redis_cluster.primaries())
    assert sum(n["slots"] for n in nodes) == 16384
    assert all(len(n["replicas"]) == 1 and n["role"] in ("master", "primary")
               for n in nodes), json.dumps(nodes)
    # the private cluster runs without a memory limit: a warning per primary
    assert report["warnings"] >= 3
    # the same servers reached as one server: a cluster node is not standalone's
    del settings["redis"]["mode"]
    path.write_text(yaml.safe_dump(settings))
    done = featcache("validate", "--config", str(path))
    assert done.returncode == EX_CONFIG, done.stdout + done.stderr
    assert "cluster" in done.stderr


def test_a_sentinel_set_reports_the_primary_it_names(
    redis_sentinel: EmbeddedSentinel, sentinel_key_prefix: str, sqlite_target: SqlTarget,
    tmp_path: Path,
) -> None:
    _table(sqlite_target, indexed=True)
    path = write_config(tmp_path / "s.yaml", f"redis://{redis_sentinel.primary()}/0",
                        sentinel_key_prefix, sqlite_target.url)
    settings = yaml.safe_load(path.read_text())
    settings["redis"].update(mode="sentinel", master_name=redis_sentinel.master_name,
                             sentinels=[f"{h}:{p}" for h, p in redis_sentinel.sentinels])
    path.write_text(yaml.safe_dump(settings))
    report = _json(featcache("validate", "--config", str(path), "--json"))
    assert report["errors"] == 0, report["findings"]
    assert report["redis"]["url"].startswith("sentinel ")
    (node,) = report["redis"]["nodes"]
    assert node["address"] == redis_sentinel.primary()
    assert node["role"] in ("master", "primary") and len(node["replicas"]) == 1, node
