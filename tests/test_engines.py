"""Materializing on real engines: Ray on this machine (``ray.init(num_cpus=2)``) and Spark in
local mode (``local[2]``, with task retries), each session shared by the module.

Both load 1,000,000 rows written the same way into SQLite and into Parquet: the engine reads
the Parquet file, featcache writes through ``write_batches`` in every worker, and every 7th row
(142,858 of them, spread over every partition) read back through ``get_features`` equals SQL's
latest row. A Spark task that fails on its first
attempt, after it wrote part of its partition, is retried: no duplicate, no older value.

Without the engine (``pip install 'featcache[spark]'`` / ``'featcache[ray]'``) or, for Spark,
without Java, the tests of that engine are skipped with the reason; ``.ci/run`` installs both
and requires them (FEATCACHE_TEST_REQUIRE=spark,ray).
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
from servers import unavailable

from featcache import CacheConfig, Feature, FeatureCache, FeatureView, Status
from featcache.config_sections import OfflineStoreConfig, RedisConfig
from featcache.offline import OfflineStore

ROWS = 1_000_000
VIEW = "big"
T0_US = int(dt.datetime(2026, 1, 1, tzinfo=dt.UTC).timestamp() * 1_000_000)
FEATURES = (Feature("clicks", "int", "1h"), Feature("ctr", "float", "1h"),
            Feature("country", "str", "1h"))


def rows_table(n: int, version: int = 0) -> pa.Table:
    """``n`` rows of the view: ids 1..n, values derived from the id (and ``version``)."""
    ids = np.arange(1, n + 1, dtype=np.int64)
    return pa.table({
        "entity_id": ids,
        "event_ts": pa.array(T0_US + ids * 1000 + version * 3_600_000_000,
                             pa.timestamp("us", "UTC")),
        "clicks": ids * 3 + version,
        "ctr": ids / 7.0 + version,
        "country": pa.array(np.char.add("c", (ids % 97).astype(str)).tolist()),
    })


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """The rows in a SQLite table (ADBC's bulk ingest) and in one Parquet file."""
    import adbc_driver_sqlite.dbapi as sqlite_driver  # noqa: PLC0415

    root = tmp_path_factory.mktemp("engines")
    db, parquet = root / "offline.db", root / "rows.parquet"
    table = rows_table(ROWS)
    with sqlite_driver.connect(str(db)) as conn, conn.cursor() as cur:
        cur.adbc_ingest(VIEW, table, mode="create")
        cur.execute(f"CREATE INDEX ix_{VIEW} ON {VIEW} (entity_id, event_ts)")
        conn.commit()
    pq.write_table(table, parquet, row_group_size=100_000)
    return f"sqlite:///{db}", parquet


def config_for(url: str, redis_url: str, prefix: str) -> CacheConfig:
    from featdata import redis_config  # noqa: PLC0415

    view = FeatureView(name=VIEW, table=VIEW, entity_column="entity_id",
                       event_timestamp_column="event_ts", features=FEATURES)
    return CacheConfig(views=(view,), redis=redis_config(redis_url, prefix),
                       offline_store=OfflineStoreConfig(url=url))


def assert_equal_to_sql(config: CacheConfig, step: int = 1) -> None:
    """Every ``step``-th row read back through ``get_features`` equals SQL's latest row."""
    ids = list(range(1, ROWS + 1, step))
    names = [f.name for f in FEATURES]
    offline = OfflineStore(config.offline_store, config.views)
    try:
        with FeatureCache(config) as cache:
            for start in range(0, len(ids), 20_000):
                chunk = ids[start : start + 20_000]
                got = cache.get_features(chunk, names)
                assert set(got.status_counts()) == {Status.HIT_REDIS}, got.status_counts()
                sql, _ = offline.fetch_latest(config.views[0], chunk)
                for entity in chunk:
                    assert tuple(got[entity].values()) == sql[entity].values, entity
                    assert (got.event_timestamp(entity, "clicks")
                            == dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
                            + dt.timedelta(microseconds=sql[entity].event_us - T0_US))
    finally:
        offline.close()


# ------------------------------------------------------------------------------ Ray


@pytest.fixture(scope="module")
def ray_session() -> Iterator[Any]:
    try:
        import ray  # noqa: PLC0415
    except ImportError:
        unavailable("ray", "ray is not installed (pip install 'featcache[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.mark.scale
def test_ray_loads_a_million_rows_equal_to_sql(
    ray_session: Any, dataset: tuple[str, Path], redis_url: str, key_prefix: str,
) -> None:
    from featcache.ray import materialize  # noqa: PLC0415

    url, parquet = dataset
    config = config_for(url, redis_url, key_prefix)
    report = materialize(ray_session.data.read_parquet(str(parquet)), VIEW, config)
    assert (report.rows_received, report.rows_written) == (ROWS, ROWS)
    assert report.fenced_off == report.skipped_older == 0
    assert_equal_to_sql(config, step=7)


def test_ray_a_failing_block_raises(
    ray_session: Any, dataset: tuple[str, Path], redis_url: str, key_prefix: str,
) -> None:
    from featcache.ray import materialize  # noqa: PLC0415

    url, _ = dataset
    bad = ray_session.data.from_arrow(rows_table(10).set_column(
        2, "clicks", pa.array(["x"] * 10)))
    with pytest.raises(Exception, match="column 'clicks'"):
        materialize(bad, VIEW, config_for(url, redis_url, key_prefix))


# ------------------------------------------------------------------------------ Spark


@pytest.fixture(scope="module")
def spark() -> Iterator[Any]:
    try:
        from pyspark.sql import SparkSession  # noqa: PLC0415
    except ImportError:
        unavailable("spark", "pyspark is not installed (pip install 'featcache[spark]')")
    if shutil.which("java") is None:
        unavailable("spark", "no Java runtime (java is not on PATH): Spark needs a JDK 17+")
    # the workers run this interpreter, where featcache is installed
    previous = os.environ.get("PYSPARK_PYTHON")
    os.environ["PYSPARK_PYTHON"] = sys.executable
    session = (SparkSession.builder.master("local[2,3]")  # 2 threads, a task tried 3 times
               .appName("featcache-tests")
               .config("spark.ui.enabled", "false")
               .config("spark.sql.shuffle.partitions", "4")
               .config("spark.sql.execution.arrow.maxRecordsPerBatch", "10000")
               .getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    try:
        yield session
    finally:
        session.stop()
        if previous is None:
            os.environ.pop("PYSPARK_PYTHON", None)
        else:
            os.environ["PYSPARK_PYTHON"] = previous


@pytest.mark.scale
def test_spark_loads_a_million_rows_equal_to_sql(
    spark: Any, dataset: tuple[str, Path], redis_url: str, key_prefix: str,
) -> None:
    from featcache.spark import materialize  # noqa: PLC0415

    url, parquet = dataset
    config = config_for(url, redis_url, key_prefix)
    df = spark.read.parquet(str(parquet)).repartition(8)
    report = materialize(df, VIEW, config)
    assert (report.rows_received, report.rows_written) == (ROWS, ROWS)
    assert report.fenced_off == report.skipped_older == 0
    assert_equal_to_sql(config, step=7)


def test_a_retried_spark_task_leaves_no_duplicate_and_no_older_value(
    spark: Any, redis_url: str, key_prefix: str, tmp_path: Path,
) -> None:
    """Partition 0 fails on its first attempt after half of its batches went through the
    writer; Spark retries it. Meanwhile newer rows of some ids were written by another
    writer: the retry writes none of its older rows over them."""
    from pyspark import TaskContext  # noqa: PLC0415

    from featcache.spark import materialize  # noqa: PLC0415

    db = tmp_path / "offline.db"
    sa.create_engine(f"sqlite:///{db}").dispose()
    config = config_for(f"sqlite:///{db}", redis_url, key_prefix)
    n = 20_000
    with FeatureCache(config) as cache:  # newer rows for ids 1-100, from elsewhere
        cache.put_rows(VIEW, rows_table(100, version=5))

    def fail_once(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        context = TaskContext.get()
        for i, batch in enumerate(batches):
            if context.partitionId() == 0 and context.attemptNumber() == 0 and i == 1:
                raise RuntimeError("the first attempt of partition 0 dies here")
            yield batch

    source = spark.createDataFrame(rows_table(n).to_pandas()).repartition(2)
    flaky = source.mapInArrow(fail_once, source.schema)
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "2000")
    try:
        report = materialize(flaky, VIEW, config)
    finally:
        spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "10000")
    # the failed attempt's rows were received and written once more by its retry
    assert report.rows_received == n
    names = [f.name for f in FEATURES]
    with FeatureCache(config) as cache:
        got = cache.get_features(list(range(1, n + 1)), names)
        assert set(got.status_counts()) == {Status.HIT_REDIS}
        expected_new = rows_table(100, version=5).to_pylist()
        for row in expected_new:  # never replaced by the retry's older rows
            assert got[row["entity_id"]]["clicks"] == row["clicks"]
        for entity in range(101, n + 1):
            assert got[entity]["clicks"] == entity * 3
    assert report.skipped_older >= 100


def test_an_invalidation_racing_a_spark_load_is_not_overwritten(
    spark: Any, redis_url: str, key_prefix: str, tmp_path: Path,
) -> None:
    """While the job runs, an ETL invalidates ids 5 and 9000 (from inside the job's first
    partition, before the batches holding them reach the writer): neither is written over;
    every other row is."""
    import adbc_driver_sqlite.dbapi as sqlite_driver  # noqa: PLC0415

    from featcache.spark import materialize  # noqa: PLC0415

    n = 20_000
    db = tmp_path / "offline.db"
    with sqlite_driver.connect(str(db)) as conn, conn.cursor() as cur:
        cur.adbc_ingest(VIEW, rows_table(n), mode="create")  # what SQL has, for the refills
        conn.commit()
    config = config_for(f"sqlite:///{db}", redis_url, key_prefix)

    def etl_invalidates(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from pyspark import TaskContext  # noqa: PLC0415

        from featcache.parts import Parts  # noqa: PLC0415

        if TaskContext.get().partitionId() == 0:
            with Parts(config) as etl:
                etl.invalidate(VIEW, [5, 9000])
        yield from batches

    source = spark.createDataFrame(rows_table(n).to_pandas()).coalesce(1)
    report = materialize(source.mapInArrow(etl_invalidates, source.schema), VIEW, config)
    assert report.rows_received == n
    assert (report.rows_written, report.invalidated) == (n - 2, 2)
    with FeatureCache(config) as cache:
        got = cache.get_features([5, 9000, 6], ["clicks"])
        assert got.status(6, "clicks") is Status.HIT_REDIS
        # not written over: their next read went to SQL
        assert got.status(5, "clicks") is Status.FILLED
        assert got.status(9000, "clicks") is Status.FILLED


# ------------------------------------------------------------------------------ a cluster


def test_spark_and_ray_load_into_a_redis_cluster_grouping_writes_by_node(
    spark: Any, ray_session: Any, redis_cluster: Any, cluster_key_prefix: str,
    tmp_path: Path,
) -> None:
    """Both engines' workers write through a cluster backend (each batch's rows grouped by
    slot and sent one round trip per node): every row lands on the node that owns it and
    reads back equal to SQL."""
    import adbc_driver_sqlite.dbapi as sqlite_driver  # noqa: PLC0415

    from featcache.keys import CLUSTER_BUCKETS, KeyLayout  # noqa: PLC0415
    from featcache.ray import materialize as ray_materialize  # noqa: PLC0415
    from featcache.spark import materialize as spark_materialize  # noqa: PLC0415

    n = 30_000
    db, parquet = tmp_path / "offline.db", tmp_path / "rows.parquet"
    table = rows_table(n)
    with sqlite_driver.connect(str(db)) as conn, conn.cursor() as cur:
        cur.adbc_ingest(VIEW, table, mode="create")
        conn.commit()
    pq.write_table(table, parquet, row_group_size=5_000)
    plain = config_for(f"sqlite:///{db}", "redis://unused:1/0", cluster_key_prefix)
    names = [f.name for f in FEATURES]
    for engine in ("spark", "ray"):
        prefix = cluster_key_prefix
        _unlink_everywhere(redis_cluster.urls, prefix)  # each engine loads an empty cache
        config = plain.replace(redis=RedisConfig(url=f"redis://{redis_cluster.seeds[0]}/0",
                                                 mode="cluster", key_prefix=prefix))
        if engine == "spark":
            report = spark_materialize(spark.read.parquet(str(parquet)).repartition(4), VIEW,
                                       config)
        else:
            report = ray_materialize(ray_session.data.read_parquet(str(parquet)), VIEW,
                                     config)
        assert (report.rows_received, report.rows_written) == (n, n), engine
        layout = KeyLayout(prefix, buckets=CLUSTER_BUCKETS)
        owners = {redis_cluster.node_for_key(layout.row_key(VIEW, e)).port
                  for e in range(1, n + 1, 97)}
        assert len(owners) == 3, owners  # the rows spread over every primary
        with FeatureCache(config) as cache:
            got = cache.get_features(list(range(1, n + 1)), names)
            assert set(got.status_counts()) == {Status.HIT_REDIS}, (engine,
                                                                    got.status_counts())
            for row in table.slice(0, n).to_pylist()[::101]:
                assert got[row["entity_id"]] == {k: row[k] for k in names}, engine


def _unlink_everywhere(urls: list[str], prefix: str) -> None:
    import redis  # noqa: PLC0415

    for url in urls:
        client = redis.Redis.from_url(url)
        try:
            pipe = client.pipeline(transaction=False)
            for key in client.scan_iter(match=f"{prefix}:*", count=1000):
                pipe.unlink(key)  # one key a command: a node's keys lie in many slots
            pipe.execute()
        finally:
            client.close()
