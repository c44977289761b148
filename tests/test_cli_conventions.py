"""The ``featcache`` console script as a shell script or a scheduler meets it: exit statuses
that say what to do next (retry only 75), global options on either side of the command, the
config's durations, and ``warm`` without ``--once``. Each test runs the installed console
script against the fixtures' private Valkey and SQLite files; a closed loopback port (bound,
then released, nothing listening) is a server that is down."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from clienv import closed_port, featcache, write_config
from featcache.jobs import cli
from featdata import STATS_FEATURES, insert, make_table, stats_row
from servers import SqlTarget

from featcache import FeatureCache
from featcache import errors as e
from featcache.materialize import CHUNK_ROWS

EX_USAGE, EX_DATAERR, EX_UNAVAILABLE, EX_TEMPFAIL, EX_CONFIG = 2, 65, 69, 75, 78


@pytest.fixture
def config_file(sqlite_target: SqlTarget, redis_url: str, key_prefix: str,
                tmp_path: Path) -> Path:
    engine = sqlite_target.engine()
    insert(engine, make_table(engine, None, "cv", STATS_FEATURES),
           [stats_row(i) for i in range(1, 6)])
    return write_config(tmp_path / "featcache.yaml", redis_url, key_prefix, sqlite_target.url)


def one_error_line(done: subprocess.CompletedProcess[str], status: int, message: str) -> None:
    assert (done.returncode, done.stdout) == (status, ""), (done.returncode, done.stderr)
    assert done.stderr.startswith("featcache: error: ") and done.stderr.count("\n") == 1, \
        done.stderr
    assert message in done.stderr, done.stderr


# ---------------------------------------------------------------------------- exit statuses


def test_help_lists_every_exit_status(config_file: Path) -> None:
    done = featcache("--help")
    assert done.returncode == 0, done.stderr
    listed = done.stdout.split("exit statuses:\n", 1)[1]
    firsts = [line.split()[0] for line in listed.splitlines() if line[:3].strip().isdigit()]
    assert firsts == ["0", "1", "2", "65", "69", "75", "78", "130", "141", "143"], listed
    assert "worth retrying" in listed.split("\n  75 ", 1)[1].split("\n  78 ", 1)[0]
    # 2 stays what argparse exits with
    done = featcache("invalidate", "--config", str(config_file), "--view", "cv", "--all",
                     "--idz", "1")
    assert done.returncode == EX_USAGE and "unrecognized arguments: --idz" in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ids", "1,x"], "'x' is not an integer id"),
        (["--ids", ","], "no ids given"),
        (["--ids-file", "/nonexistent/ids.txt"], "cannot read ids file"),
    ],
)
def test_bad_ids_exit_65(config_file: Path, args: list[str], message: str) -> None:
    done = featcache("invalidate", "--config", str(config_file), "--view", "cv", *args)
    one_error_line(done, EX_DATAERR, message)


def test_an_ids_file_that_is_not_utf8_exits_65(config_file: Path, tmp_path: Path) -> None:
    ids = tmp_path / "ids.txt"
    ids.write_bytes("1\ncaf\xe9\n".encode("latin-1"))
    for command in ("invalidate", "materialize"):
        done = featcache(command, "--config", str(config_file), "--view", "cv",
                         "--ids-file", str(ids))
        one_error_line(done, EX_DATAERR, "is not UTF-8 text")


@pytest.mark.parametrize(
    "args",
    [
        ["invalidate", "--view", "nope", "--ids", "1"],
        ["materialize", "--view", "nope", "--all"],
        ["warm", "--once", "--view", "nope"],
    ],
)
def test_an_unknown_view_exits_78(config_file: Path, args: list[str]) -> None:
    done = featcache(args[0], "--config", str(config_file), *args[1:])
    one_error_line(done, EX_CONFIG, "unknown feature view 'nope'; known views: cv")


def test_bad_configuration_exits_78(
    config_file: Path, tmp_path: Path, redis_url: str, key_prefix: str,
    sqlite_target: SqlTarget,
) -> None:
    bad_key = tmp_path / "bad.yaml"
    bad_key.write_text(config_file.read_text().replace("clicks: int, 1h", "clicks: int, soon"))
    done = featcache("invalidate", "--config", str(bad_key), "--view", "cv", "--ids", "1")
    one_error_line(done, EX_CONFIG, "views.cv.features.clicks.max_age")
    done = featcache("warm", "--config", str(tmp_path / "missing.yaml"))
    one_error_line(done, EX_CONFIG, "missing.yaml")
    # a table the database does not have: a SchemaError, met at the view's first use
    no_table = write_config(tmp_path / "no_table.yaml", redis_url, key_prefix,
                            sqlite_target.url, table="cv_typo")
    done = featcache("materialize", "--config", str(no_table), "--view", "cv", "--all")
    one_error_line(done, EX_CONFIG, "table 'cv_typo' does not exist")


def test_redis_down_exits_75(tmp_path: Path, sqlite_target: SqlTarget, key_prefix: str) -> None:
    path = write_config(tmp_path / "c.yaml", f"redis://:s3cret@127.0.0.1:{closed_port()}/0",
                        key_prefix, sqlite_target.url)
    for args in (["invalidate", "--view", "cv", "--all"], ["warm"]):
        done = featcache(args[0], "--config", str(path), *args[1:])
        one_error_line(done, EX_TEMPFAIL, "127.0.0.1")
        assert "s3cret" not in done.stderr


def test_sql_down_exits_75(tmp_path: Path, redis_url: str, key_prefix: str) -> None:
    down = f"postgresql+psycopg://reader:s3cret@127.0.0.1:{closed_port()}/features"
    path = write_config(tmp_path / "c.yaml", redis_url, key_prefix, down)
    done = featcache("materialize", "--config", str(path), "--view", "cv", "--all")
    one_error_line(done, EX_TEMPFAIL, "unavailable")
    assert "s3cret" not in done.stderr


@pytest.mark.parametrize("sql_target", ["postgresql"], indirect=True)
def test_a_query_the_database_rejects_exits_69(
    sql_target: SqlTarget, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    # a view whose every row fails to compute: the server answers, with an error (a DataError,
    # division by zero), so running the command again gets the same answer
    schema = sql_target.schema
    with sql_target.engine().begin() as conn:
        conn.execute(sa.text(f'CREATE TABLE "{schema}".cv_base '
                             "(entity_id bigint, event_ts timestamptz, clicks bigint)"))
        conn.execute(sa.text(f'INSERT INTO "{schema}".cv_base VALUES (1, now(), 3)'))
        conn.execute(sa.text(f'CREATE VIEW "{schema}".cv AS SELECT entity_id, event_ts, '
                             f'clicks, clicks / (clicks - clicks) AS ctr FROM "{schema}".cv_base'))
    path = write_config(tmp_path / "c.yaml", redis_url, key_prefix, sql_target.url,
                        schema=schema)
    done = featcache("materialize", "--config", str(path), "--view", "cv", "--all")
    assert done.returncode == EX_UNAVAILABLE, done.stderr
    assert "featcache: error: offline store " in done.stderr
    assert "failed while reading view 'cv': division by zero" in done.stderr


class WrongCredentials(e.ConfigError):
    """A ConfigError subclass the exit statuses do not name: its base decides."""


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (e.ConfigError("x"), EX_CONFIG),
        (e.SchemaError("x"), EX_CONFIG),
        (WrongCredentials("x"), EX_CONFIG),
        (e.UnknownView("nope", ["cv"]), EX_CONFIG),  # an InvalidRequest and a KeyError too
        (e.InvalidRequest("x"), EX_DATAERR),
        (e.InvalidEntityId("x"), EX_DATAERR),
        (e.CacheUnavailable("x"), EX_TEMPFAIL),
        (e.OfflineStoreError("x"), EX_UNAVAILABLE),  # the database answered: with an error
        (e.OfflineStoreUnavailable("x"), EX_TEMPFAIL),
        (e.BackendError("x"), EX_TEMPFAIL),
        (e.EmbeddedServerError("x"), EX_UNAVAILABLE),
        (e.FeatcacheError("x"), 1),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else str(value),
)
def test_exit_status_goes_by_base_class(error: e.FeatcacheError, status: int) -> None:
    assert cli.exit_status(error) == status


# ---------------------------------------------------------------------------- conventions


def test_log_level_is_accepted_after_the_command(config_file: Path) -> None:
    after = featcache("warm", "--config", str(config_file), "--log-level", "info")
    assert after.returncode == 0, after.stderr
    assert " INFO featcache.warm: warm view=cv leader=true" in after.stderr, after.stderr
    before = featcache("--log-level", "info", "warm", "--config", str(config_file))
    assert before.returncode == 0, before.stderr
    assert " INFO featcache.warm: warm view=cv" in before.stderr, before.stderr
    # given on both sides, the one after the command wins, as a later option does
    both = featcache("--log-level", "info", "warm", "--config", str(config_file),
                     "--log-level", "error")
    assert (both.returncode, both.stderr) == (0, "")
    version = featcache("invalidate", "--version")
    assert version.returncode == 0 and version.stdout.startswith("featcache ")


def test_log_format_json_writes_one_object_per_line(config_file: Path) -> None:
    done = featcache("warm", "--config", str(config_file), "--log-level", "info",
                     "--log-format", "json")
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stderr.splitlines()]
    assert records and all(set(r) >= {"time", "level", "logger", "message"} for r in records)
    assert any(r["logger"] == "featcache.warm" and r["level"] == "INFO"
               and r["message"].startswith("warm view=cv") for r in records), records
    failed = featcache("--log-format", "json", "warm", "--config", str(config_file),
                       "--view", "nope")
    assert failed.returncode == EX_CONFIG
    (error,) = [json.loads(line) for line in failed.stderr.splitlines()]
    assert error["level"] == "ERROR" and error["message"].startswith("featcache: error: ")
    assert "nope" in error["message"]


def _warm_pass(config_file: Path, *args: str) -> dict[str, Any]:
    done = featcache("warm", "--config", str(config_file), "--k", "10", *args)
    assert done.returncode == 0, done.stderr
    (report,) = json.loads(done.stdout)["views"]
    assert isinstance(report, dict)
    return report


def test_warm_horizon_takes_the_configs_durations(config_file: Path) -> None:
    with FeatureCache.from_config(config_file) as cache:
        cache.get_features([1, 2], ["ctr"])  # cached now; the view's shortest max_age is 10m
        popularity = cache.popularity
        assert popularity is not None
        popularity.record("cv", [1, 2])
        popularity.flush()
    # 9m: both rows are fresh at now + 9m; 11m: both are stale by then, so both rewritten
    assert (_warm_pass(config_file, "--horizon", "9m")["expiring"]) == 0
    assert (_warm_pass(config_file, "--horizon", "11m")["expiring"]) == 2
    assert (_warm_pass(config_file, "--horizon", "539")["expiring"]) == 0
    assert (_warm_pass(config_file, "--horizon", "661000ms")["expiring"]) == 2
    done = featcache("warm", "--config", str(config_file), "--horizon", "5x")
    assert done.returncode == EX_USAGE
    assert "argument --horizon: expected a duration like 30, '500ms'" in done.stderr


def test_warm_without_once_runs_one_pass(config_file: Path) -> None:
    with FeatureCache.from_config(config_file) as cache:
        popularity = cache.popularity
        assert popularity is not None
        popularity.record("cv", [3, 4])
        popularity.flush()
    report = _warm_pass(config_file)
    assert (report["leader"], report["candidates"], report["missing"]) == (True, 2, 2)
    assert report["materialized"]["rows_written"] == 2
    assert _warm_pass(config_file, "--once")["missing"] == 0  # the same pass, and it is done
    helped = featcache("warm", "--help").stdout
    assert "not available yet" not in helped and "featcache warmer" in " ".join(helped.split())


def test_the_chunk_default_of_the_command_line_is_materializes() -> None:
    """``--chunk-rows``' default is spelled in the command line, which may not import the
    bulk path for ``--help``: it must be ``materialize``'s own."""
    assert cli._CHUNK_ROWS == CHUNK_ROWS
