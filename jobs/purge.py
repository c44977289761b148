"""``featcache purge``: delete featcache's keys of one view, or every key under the prefix.

The keys are found by ``SCAN`` with the patterns of ``KeyLayout.scan_patterns`` on every
server that holds keys (each primary of a cluster) and deleted by ``UNLINK`` a scan step at a
time (``featcache.redis_store.admin``): memory is bounded by one step, the server frees the
values in the background, and no key outside the patterns is ever named. A view's keys are its
rows (negative entries and tombstones included), its fill leases, its epoch and its
bookkeeping (popularity, the warmer's lease, watermark and health); ``--all`` is everything
under ``<prefix>:``, the invalidation stream included.

Safe while servers run: every key deleted is a miss afterwards, read again from SQL. A deleted
epoch is created again from the server's clock, so a fill read before the purge is fenced off
as after a whole-view invalidation. Keys written while the scan runs may stay: run it again.

On a terminal the keys are counted first (a scan without deletes): the confirmation question
says how many, and the bar has a total and an ETA. Otherwise progress goes to the
``featcache.purge`` logger (INFO, ``--log-level info``), at most a line every two seconds.
One JSON line at the end.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import TextIO

from rich import progress as rich_progress

from featcache.config import load_config
from featcache.keys import KeyLayout
from featcache.redis_store import RedisStore, open_store
from featcache.redis_store.admin import Node, primaries, scan, unlink

__all__ = ["PurgeReport", "count_keys", "purge", "run_purge"]

log = logging.getLogger("featcache.purge")

#: keys a SCAN step examines (and so about the most one UNLINK names)
SCAN_COUNT = 1000
_LOG_EVERY_S = 2.0


@dataclass(frozen=True, slots=True)
class PurgeReport:
    """``deleted``: keys that existed when unlinked; ``nodes``: servers scanned."""

    key_prefix: str
    view: str | None
    patterns: tuple[str, ...]
    deleted: int = 0
    nodes: int = 0
    seconds: float = 0.0
    cancelled: bool = False


def count_keys(nodes: list[Node], patterns: list[str]) -> int:
    """How many keys match ``patterns`` on ``nodes``: a scan that deletes nothing."""
    return sum(len(keys) for node in nodes for pattern in patterns
               for keys in scan(node, pattern, SCAN_COUNT))


def purge(store: RedisStore, nodes: list[Node], patterns: list[str], *, cluster: bool,
          progress: Callable[[int], None] | None = None) -> int:
    """Delete every key matching ``patterns`` on ``nodes``; how many existed. ``progress``
    is told the running total after every step."""
    deleted = 0
    for node in nodes:
        for pattern in patterns:
            for keys in scan(node, pattern, SCAN_COUNT):
                deleted += unlink(store, keys, cluster)
                if progress is not None:
                    progress(deleted)
    return deleted


@contextlib.contextmanager
def _progress(label: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """A bar with a total and an ETA on a terminal, else INFO lines every two seconds."""
    if sys.stdout.isatty():
        with rich_progress.Progress(
            rich_progress.TextColumn("{task.description}"), rich_progress.BarColumn(),
            rich_progress.MofNCompleteColumn(), rich_progress.TimeElapsedColumn(),
            rich_progress.TimeRemainingColumn(), transient=True,
        ) as bar:
            task = bar.add_task(label, total=total)

            def update(deleted: int) -> None:
                # keys written since the count make the total grow, never the bar overflow
                if total is not None and deleted > total:
                    bar.update(task, total=deleted)
                bar.update(task, completed=deleted)

            yield update
        return
    started = last = time.monotonic()

    def log_line(deleted: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= _LOG_EVERY_S:
            last = now
            log.info("progress %s deleted=%d seconds=%.1f", label, deleted, now - started)

    yield log_line


def _confirmed(question: str) -> bool:
    """Asked on standard error, answered on standard input: only y or yes goes ahead."""
    sys.stderr.write(f"{question} [y/N] ")
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def run_purge(config_path: str, view_name: str | None, *, yes: bool = False,
              out: TextIO | None = None) -> PurgeReport:
    """``featcache purge``: ``view_name`` None is every key under the prefix. Without
    ``yes`` the caller has made sure standard input is a terminal to ask on."""
    config = load_config(config_path)
    view = config.view(view_name).name if view_name is not None else None
    section = config.redis
    layout = KeyLayout.for_mode(section.key_prefix, section.mode)
    patterns = layout.scan_patterns(view)
    report = PurgeReport(section.key_prefix, view, tuple(patterns))
    what = f"view {view}" if view is not None else f"everything under {section.key_prefix}:"
    store = open_store(section, None, config.degradation)
    try:
        nodes = primaries(store, section.mode)
        where = f"{store.url} ({len(nodes)} primaries)" if len(nodes) > 1 else store.url
        total = count_keys(nodes, patterns) if not yes or sys.stdout.isatty() else None
        if not yes and not _confirmed(f"Delete {total:,} keys of {what} on {where}?"):
            print("featcache: purge cancelled, nothing deleted", file=sys.stderr)
            report = PurgeReport(section.key_prefix, view, tuple(patterns), nodes=len(nodes),
                                 cancelled=True)
        else:
            started = time.perf_counter()
            with _progress(f"purge {what}", total) as progress:
                deleted = purge(store, nodes, patterns, cluster=section.mode == "cluster",
                                progress=progress)
            report = PurgeReport(section.key_prefix, view, tuple(patterns), deleted,
                                 len(nodes), round(time.perf_counter() - started, 3))
            log.info("purge %s deleted=%d nodes=%d seconds=%.3f", what, deleted, len(nodes),
                     report.seconds)
    finally:
        store.close()
    if not report.cancelled:
        (out or sys.stdout).write(json.dumps(asdict(report)) + "\n")
    return report
