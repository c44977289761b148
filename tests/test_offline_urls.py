"""Offline store URLs as users write them: ``postgresql://``, ``mysql://`` and ``mariadb://``
name no driver, and SQLAlchemy's default ones (psycopg2 before SQLAlchemy 2.1; mysqlclient,
imported as ``MySQLdb``) are not installed with featcache, so they use psycopg 3 and PyMySQL;
a URL naming a driver that is not installed is a ``ConfigError`` saying which URL works.
Real servers only: the fixtures' private PostgreSQL and MariaDB when configured; a closed
loopback port is a server that is down."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlalchemy as sa
from clienv import closed_port, featcache, write_config
from featdata import STATS_FEATURES, insert, make_table, make_view, stats_row
from servers import SqlTarget

from featcache import CacheConfig, FeatureCache, OfflineStoreConfig, RedisConfig, Status
from featcache.errors import ConfigError

EX_TEMPFAIL, EX_CONFIG = 75, 78


def without_driver(url: str, dialect: str) -> str:
    return sa.make_url(url).set(drivername=dialect).render_as_string(hide_password=False)


@pytest.mark.parametrize("sql_target", ["postgresql", "mysql"], indirect=True)
def test_urls_without_a_driver_use_the_one_featcache_installs(
    sql_target: SqlTarget, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    engine = sql_target.engine()
    insert(engine, make_table(engine, sql_target.schema, "cv", STATS_FEATURES),
           [stats_row(i) for i in range(1, 4)])
    dialects = ("postgresql",) if sql_target.name == "postgresql" else ("mysql", "mariadb")
    for dialect in dialects:
        url = without_driver(sql_target.url, dialect)
        path = write_config(tmp_path / f"{dialect}.yaml", redis_url, f"{key_prefix}{dialect}",
                            url, schema=sql_target.schema)
        done = featcache("materialize", "--config", str(path), "--view", "cv", "--all")
        assert done.returncode == 0, (url, done.stderr)
        assert json.loads(done.stdout)["rows_written"] == 3
        with FeatureCache.from_config(path) as cache:
            result = cache.get_features([1, 9], ["clicks"])
        assert [result.status(i, "clicks") for i in (1, 9)] == [Status.HIT_REDIS, Status.ABSENT]


@pytest.mark.parametrize("dialect", ["mysql", "mariadb"])
def test_a_mysql_url_without_a_driver_reaches_the_server_through_pymysql(
    dialect: str, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    # no server listens: the engine was created, and the connection it tried failed
    url = f"{dialect}://reader:s3cret@127.0.0.1:{closed_port()}/features"
    path = write_config(tmp_path / "c.yaml", redis_url, key_prefix, url)
    done = featcache("materialize", "--config", str(path), "--view", "cv", "--all")
    assert done.returncode == EX_TEMPFAIL, done.stderr
    assert done.stderr.startswith("featcache: error: offline store ") \
        and "unavailable" in done.stderr, done.stderr
    assert "MySQLdb" not in done.stderr and "s3cret" not in done.stderr


@pytest.mark.parametrize(
    ("url", "hint"),
    [
        ("mysql+mysqldb://u:s3cret@db/f",
         "the driver 'mysqldb' is not available: write mysql+pymysql:// (or mysql://"),
        ("mariadb+mysqlconnector://u:s3cret@db/f", "write mariadb+pymysql://"),
        ("postgresql+psycopg2://u:s3cret@db/f",
         "the driver 'psycopg2' is not available: write postgresql+psycopg:// (or "
         "postgresql://, which uses psycopg)"),
        ("postgresql+psycopg3://u:s3cret@db/f", "write postgresql+psycopg://"),
        ("postgres://u:s3cret@db/f", "unknown dialect 'postgres', did you mean postgresql://?"),
        ("mssql://u:s3cret@db/f", "SQLAlchemy's mssql driver is not available: install it, or "
                                  "name an installed one (mssql+DRIVER://)"),
    ],
)
def test_a_driver_that_is_not_installed_names_the_url_that_works(
    url: str, hint: str, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    config = CacheConfig(views=(make_view("cv", "cv", None),),
                         redis=RedisConfig(url=redis_url, key_prefix=key_prefix),
                         offline_store=OfflineStoreConfig(url=url))
    with pytest.raises(ConfigError) as caught:
        FeatureCache(config)
    assert caught.value.path == "offline_store.url"
    assert hint in str(caught.value) and "s3cret" not in str(caught.value), str(caught.value)
    path = write_config(tmp_path / "c.yaml", redis_url, key_prefix, url)
    # a command that reads SQL (invalidating needs Redis alone, and never opens the URL)
    done = featcache("materialize", "--config", str(path), "--view", "cv", "--all")
    assert done.returncode == EX_CONFIG and hint in done.stderr, done.stderr


def test_the_demo_takes_the_same_urls() -> None:
    done = featcache("demo", "--quick", "--offline-url", "mysql+mysqldb://u:s3cret@db/f")
    assert done.returncode == EX_CONFIG, done.stderr
    assert done.stderr.startswith("featcache: error: --offline-url: cannot use offline store ")
    assert "write mysql+pymysql://" in done.stderr and "s3cret" not in done.stderr
    url = f"mysql://reader:s3cret@127.0.0.1:{closed_port()}/features"
    done = featcache("demo", "--quick", "--offline-url", url)
    assert done.returncode == EX_TEMPFAIL, done.stderr
    assert "MySQLdb" not in done.stderr and "s3cret" not in done.stderr
