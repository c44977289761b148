"""How the command line's log records (and its final error line) are written: as text for a
person, or as one JSON object per line for a log collector (``--log-format json``)."""

from __future__ import annotations

import datetime as dt
import json
import logging

__all__ = ["TEXT_FORMAT", "JsonFormatter", "error_line"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message"}`` (and ``"exception"`` with a traceback), one
    line per record: a collector needs no pattern to split the fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def error_line(message: str, log_format: str) -> str:
    """The line a failed command ends with on stderr."""
    if log_format == "json":
        return json.dumps({"time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
                           "level": "ERROR", "logger": "featcache",
                           "message": f"featcache: error: {message}"})
    return f"featcache: error: {message}"
