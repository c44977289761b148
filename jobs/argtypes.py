"""The command line's argument types: text to a checked value, or argparse's usage error.

Shared by every command's parser (``cli.py`` and the commands with parsers of their own), so
each kind of value is read, and rejected, the same way everywhere.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from featcache.config_sections import parse_duration
from featcache.errors import ConfigError

__all__ = ["duration", "int_at_least", "number_above", "number_at_least", "rate"]


def int_at_least(low: int) -> Callable[[str], int]:
    """An integer of at least ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def duration(text: str) -> float:
    """A duration as the config writes them (``90``, ``500ms``, ``5m``, ``1h``), in seconds."""
    try:
        return parse_duration(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def number_at_least(text: str) -> float:
    """A finite number >= 0 (NaN rejected)."""
    value = _number(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def number_above(text: str) -> float:
    """A finite number > 0."""
    value = _number(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number greater than 0, got {text}")
    return value


def rate(text: str) -> float:
    """A rate: greater than 0, at most 1."""
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be greater than 0 and at most 1, got {text}")
    return value
