"""``featcache materialize`` (every view, one view, or a view's rows from Parquet files) and
``featcache warm --once``: the command line around ``featcache.materialize``, with its
progress and its one JSON line.

Progress: a rich progress bar when stdout is a terminal (entities done of the total, with the
time left: for ``all`` and ``since`` the total is counted in the background while the run
starts), else ``key=value`` log lines on the ``featcache.warm`` logger.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import glob
import json
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any, TextIO

from rich import progress as rich_progress

from featcache.config import load_config
from featcache.errors import InvalidRequest
from featcache.materialize import (
    CHUNK_ROWS,
    IncrementalReport,
    MaterializeReport,
    WarmReport,
    WriteReport,
    load_epoch,
    materialize,
    materialize_incremental,
    warm_once,
    write_batches,
)
from featcache.offline import EventWindow
from featcache.offline.bulk import count_entity_ids
from featcache.parts import Parts
from featcache.request import EntityId

from .hook import read_ids_file

__all__ = ["progress_reporter", "run_incremental", "run_materialize", "run_parquet",
           "run_warm_once"]

log = logging.getLogger("featcache.warm")


# ----------------------------------------------------------------------------- progress


def _entities(report: Any) -> int:
    done: int = report.entities
    return done


@contextlib.contextmanager
def progress_reporter(
    label: str, total: int | None = None, count: Callable[[], int] | None = None,
    *, done: Callable[[Any], int] = _entities,
) -> Iterator[Callable[[Any], None]]:
    """A ``progress`` callback for running reports (``MaterializeReport``, ``WriteReport``):
    a rich bar when stdout is a terminal (``done(report)`` of ``total``: entities by default,
    and the time left once the total is known), else log lines. ``count`` finds an unknown
    total, on a terminal only, in a thread of its own: the bar starts at once and shows the
    total when the count ends (a ``COUNT(DISTINCT)`` scans the table)."""
    if sys.stdout.isatty():
        with rich_progress.Progress(
            rich_progress.TextColumn("{task.description}"), rich_progress.BarColumn(),
            rich_progress.MofNCompleteColumn(),
            rich_progress.TextColumn("written {task.fields[written]}"),
            rich_progress.TimeElapsedColumn(), rich_progress.TimeRemainingColumn(),
            transient=True,
        ) as bar:
            task = bar.add_task(label, total=total, written=0)
            if total is None and count is not None:
                threading.Thread(target=_count_into, args=(bar, task, count), daemon=True,
                                 name="featcache-materialize-count").start()

            def update(report: Any) -> None:
                bar.update(task, completed=done(report), written=report.rows_written)

            yield update
        return

    def log_line(report: Any) -> None:
        figures = " ".join(f"{key}={value:.3f}" if isinstance(value, float) else
                           f"{key}={value}" for key, value in asdict(report).items()
                           if isinstance(value, int | float) and not isinstance(value, bool))
        log.info("progress %s %s%s", label, figures, f" total={total}" if total else "")

    yield log_line


def _count_into(bar: rich_progress.Progress, task: rich_progress.TaskID,
                count: Callable[[], int]) -> None:
    """The bar's total, from ``count``; a count that fails leaves the bar without one (the
    run itself says what failed, if anything did)."""
    try:
        total = count()
    except Exception as exc:
        log.debug("materialize: no total for the progress bar: %s", exc)
        return
    bar.update(task, total=total)


# ----------------------------------------------------------------------------- CLI


def run_materialize(
    config_path: str,
    view_name: str | None,
    *,
    all: bool = False,
    ids_file: str | None = None,
    since: dt.datetime | None = None,
    window: EventWindow | None = None,
    chunk_rows: int = CHUNK_ROWS,
    out: TextIO = sys.stdout,
) -> list[MaterializeReport]:
    """``featcache materialize``: one view (one JSON line, its report) or, with no view,
    every view of the config, each whole (one JSON line: ``{"views": [reports]}``);
    ``window``: only rows whose event time falls in it."""
    config = load_config(config_path)
    views = [config.view(view_name)] if view_name is not None else list(config.views)
    if view_name is None and (ids_file is not None or since is not None):
        raise InvalidRequest("--ids-file and --since need --view: ids and change times are "
                             "per view")
    ids: list[EntityId] | None = None
    if ids_file is not None:
        ids = read_ids_file(ids_file, views[0])
        if not ids:
            raise InvalidRequest(f"no ids in {ids_file}")
    reports = []
    with Parts(config) as cache:
        for view in views:
            count = functools.partial(count_entity_ids, cache.offline, view, since=since,
                                      window=window)
            with progress_reporter(f"materialize view={view.name}", len(ids) if ids else None,
                                   count=count) as bar:
                reports.append(materialize(
                    cache, view, all=all or (ids is None and since is None), ids=ids,
                    since=since, window=window, chunk_rows=chunk_rows, progress=bar))
    if view_name is not None:
        out.write(json.dumps(asdict(reports[0])) + "\n")
    else:
        out.write(json.dumps({"views": [asdict(r) for r in reports]}) + "\n")
    return reports


def run_incremental(
    config_path: str,
    view_name: str | None,
    *,
    end: dt.datetime,
    chunk_rows: int = CHUNK_ROWS,
    out: TextIO = sys.stdout,
) -> list[IncrementalReport]:
    """``featcache materialize-incremental``: one view or every view, each from where its
    last complete run ended to ``end``; one JSON line, ``{"views": [reports]}``."""
    config = load_config(config_path)
    views = [config.view(view_name)] if view_name is not None else list(config.views)
    reports = []
    with Parts(config) as cache:
        for view in views:
            with progress_reporter(f"materialize-incremental view={view.name}") as bar:
                reports.append(materialize_incremental(cache, view, end=end,
                                                       chunk_rows=chunk_rows, progress=bar))
    out.write(json.dumps({"views": [
        {"view": r.view, "start": r.start.isoformat() if r.start else None,
         "end": r.end.isoformat(), "advanced": r.advanced, **{
             k: v for k, v in asdict(r.materialized).items() if k not in ("view",
                                                                          "absent_ids")}}
        for r in reports]}) + "\n")
    return reports


def run_parquet(
    config_path: str,
    view_name: str,
    pattern: str,
    *,
    batch_rows: int = 10_000,
    out: TextIO = sys.stdout,
) -> WriteReport:
    """``featcache materialize --view V --from-parquet GLOB``: every file the pattern matches
    (sorted; a pattern matching none is an error), read ``batch_rows`` rows at a time and
    written through ``write_batches``. One JSON line: the report and the files."""
    import pyarrow.parquet as pq  # noqa: PLC0415 - only this path reads Parquet

    config = load_config(config_path)
    view = config.view(view_name)
    files = sorted(glob.glob(os.path.expanduser(pattern)))
    if not files:
        raise InvalidRequest(f"--from-parquet {pattern!r} matches no file")
    try:
        opened = [pq.ParquetFile(path) for path in files]
    except (OSError, ValueError) as exc:  # not Parquet, unreadable
        raise InvalidRequest(f"--from-parquet: {exc}") from None
    total = sum(f.metadata.num_rows for f in opened)
    columns = [view.entity_column, view.event_timestamp_column,
               *(f.column for f in view.features)]

    def batches() -> Iterator[Any]:
        for path, parquet in zip(files, opened, strict=True):
            lacking = [c for c in columns if c not in parquet.schema_arrow.names]
            if lacking:
                raise InvalidRequest(f"{path} lacks the column(s) {', '.join(lacking)} of "
                                     f"view {view.name!r}")
            yield from parquet.iter_batches(batch_size=batch_rows, columns=columns)

    with Parts(config) as cache, progress_reporter(
            f"materialize view={view.name} parquet", total,
            done=lambda r: r.rows_received) as bar:
        report = write_batches(cache, view, batches(), progress=bar,
                               since_epoch=load_epoch(cache.store, cache.layout, view.name))
    out.write(json.dumps({**asdict(report), "files": files}) + "\n")
    return report


def run_warm_once(
    config_path: str,
    view_name: str | None,
    *,
    k: int,
    horizon_s: float,
    out: TextIO = sys.stdout,
) -> list[WarmReport]:
    """``featcache warm --once``: one pass over one view (or every view); one JSON line."""
    config = load_config(config_path)
    views = [config.view(view_name)] if view_name is not None else list(config.views)
    reports = []
    with Parts(config) as cache:
        for view in views:
            with progress_reporter(f"warm view={view.name}") as bar:
                reports.append(warm_once(cache, view, k=k, horizon_s=horizon_s, progress=bar))
    out.write(json.dumps({"views": [r.as_dict() for r in reports]}) + "\n")
    return reports
