"""The ETL invalidation hook: what a pipeline runs after its transaction commits.

``featcache invalidate --config C --view V (--ids 1,2,3 | --ids-file F | --all)`` ends in the
Python call ``featcache.invalidate(view, ids, config=C)``, which needs a Redis store and the
key layout, nothing more. This module only turns command-line input into ids of the view's
declared type and prints one JSON line an ETL log can keep.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from featcache.config import FeatureView, load_config
from featcache.errors import InvalidEntityId, InvalidRequest
from featcache.invalidation import InvalidationReport, invalidate

__all__ = ["parse_ids", "read_ids_file", "run_invalidate"]


def parse_ids(texts: Iterator[str] | list[str], view: FeatureView, source: str) -> list[int | str]:
    """Ids as the view declares them: ``int`` views parse decimals (surrounding spaces
    allowed), ``str`` views keep the text exactly as written, spaces included (``'a'`` and
    ``' a'`` are two entities to the read path too); only a line ending is removed, and empty
    items are skipped."""
    ids: list[int | str] = []
    for n, line in enumerate(texts, 1):
        text = line.rstrip("\r\n")
        if view.entity_type == "int":
            text = text.strip()
        if not text:
            continue
        if view.entity_type == "int":
            try:
                ids.append(int(text))
            except ValueError:
                raise InvalidEntityId(
                    f"{source} item {n}: {text[:60]!r} is not an integer id "
                    f"(view {view.name!r} has int ids)"
                ) from None
        else:
            ids.append(text)
    return ids


def read_ids_file(path: str, view: FeatureView) -> list[int | str]:
    """One id per line (UTF-8; a byte-order mark is not part of the first id); ``-`` reads
    standard input; empty lines are skipped."""
    if path == "-":
        return parse_ids(iter(sys.stdin), view, "stdin")
    try:
        with Path(path).open(encoding="utf-8-sig") as handle:
            return parse_ids(iter(handle), view, path)
    except OSError as exc:
        raise InvalidRequest(f"cannot read ids file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"ids file {path} is not UTF-8 text: {exc.reason} at byte "
                             f"{exc.start}") from None


def run_invalidate(
    config_path: str,
    view_name: str,
    ids_csv: str | None,
    ids_file: str | None,
    whole_view: bool,
    out: TextIO | None = None,
) -> InvalidationReport:
    """``out``: where the JSON line goes (standard output as it is at the call)."""
    config = load_config(config_path)
    view = config.view(view_name)
    ids: list[int | str] | None
    if whole_view:
        ids = None
    elif ids_file is not None:
        ids = read_ids_file(ids_file, view)
    else:
        ids = parse_ids((ids_csv or "").split(","), view, "--ids")
    if ids is not None and not ids:
        raise InvalidRequest("no ids given: pass --ids, --ids-file with ids, or --all")
    report = invalidate(view.name, ids, config=config)
    (out or sys.stdout).write(json.dumps({
        "view": report.view,
        "whole_view": report.whole_view,
        "entities": report.entities,
        "stream_ids": list(report.stream_ids),
    }) + "\n")
    return report
