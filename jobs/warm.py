"""``featcache materialize`` and ``featcache warm --once``: the command line around
``featcache.materialize``, with its progress and its one JSON line.

Progress: a rich progress bar when stdout is a terminal (entities done of the total, with the
time left: for ``all`` and ``since`` the total is counted in the background while the run
starts), else ``key=value`` log lines on the ``featcache.warm`` logger.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import TextIO

from rich import progress as rich_progress

from featcache.config import load_config
from featcache.errors import InvalidRequest
from featcache.materialize import MaterializeReport, Progress, WarmReport, materialize, warm_once
from featcache.offline.bulk import count_entity_ids
from featcache.parts import Parts
from featcache.request import EntityId

from .hook import read_ids_file

__all__ = ["progress_reporter", "run_materialize", "run_warm_once"]

log = logging.getLogger("featcache.warm")


# ----------------------------------------------------------------------------- progress


@contextlib.contextmanager
def progress_reporter(
    label: str, total: int | None = None, count: Callable[[], int] | None = None
) -> Iterator[Progress]:
    """A ``progress`` callback: a rich bar when stdout is a terminal (with the entities done
    of ``total``, and the time left once the total is known), else log lines. ``count``
    finds an unknown total, on a terminal only, in a thread of its own: the bar starts at
    once and shows the total when the count ends (a ``COUNT(DISTINCT)`` scans the table)."""
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

            def update(report: MaterializeReport) -> None:
                bar.update(task, completed=report.entities, written=report.rows_written)

            yield update
        return

    def log_line(report: MaterializeReport) -> None:
        log.info(
            "progress %s entities=%d%s rows_read=%d rows_written=%d fenced_off=%d "
            "seconds=%.3f", label, report.entities, f" total={total}" if total else "",
            report.rows_read, report.rows_written, report.fenced_off, report.seconds,
        )

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
    view_name: str,
    *,
    all: bool = False,
    ids_file: str | None = None,
    since: dt.datetime | None = None,
    chunk_rows: int = 10_000,
    out: TextIO = sys.stdout,
) -> MaterializeReport:
    """``featcache materialize``: prints one JSON line with the report."""
    config = load_config(config_path)
    view = config.view(view_name)
    ids: list[EntityId] | None = None
    if ids_file is not None:
        ids = read_ids_file(ids_file, view)
        if not ids:
            raise InvalidRequest(f"no ids in {ids_file}")
    with Parts(config) as cache, progress_reporter(
            f"materialize view={view.name}", len(ids) if ids else None,
            count=lambda: count_entity_ids(cache.offline, view, since=since)) as bar:
        report = materialize(cache, view, all=all, ids=ids, since=since,
                             chunk_rows=chunk_rows, progress=bar)
    out.write(json.dumps(asdict(report)) + "\n")
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
