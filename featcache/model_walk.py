"""The walk the two model codecs share (``model_inputs``, ``model_outputs``): a refusal that
names its place, the depth bound, type names, UTC datetimes, and the descent into lists and
str-keyed dicts.

Each codec says what a leaf becomes (``each``); this module walks the containers and keeps
the path of a refused value, collected only on the way out, so a value that is accepted costs
nothing to locate.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

__all__ = ["MAX_DEPTH", "Refused", "too_deep", "type_name", "utc", "walk_items", "walk_mapping"]

#: how deep lists and dicts may nest (the value's own container is level 1); also what stops
#: a list that holds itself
MAX_DEPTH: Final = 32

_UTC: Final = dt.UTC

#: what a codec does with one value below a container: ``each(value, depth)``
Each = Callable[[Any, int], Any]


class Refused(Exception):
    """A value a codec cannot take; ``path`` collects its place on the way out."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.path: list[str] = []

    def placed(self, root: str) -> str:
        """The message, after where the value is: ``inputs[3]['age']: ...``."""
        return f"{root}{''.join(reversed(self.path))}: {self.message}"


def too_deep() -> Refused:
    return Refused(f"nested deeper than {MAX_DEPTH} levels (or it contains itself)")


def type_name(v: Any) -> str:
    """A value's type as a user knows it (``numpy.float32``, ``pandas.Timestamp``, ``dict``)."""
    t = type(v)
    module = t.__module__
    if module.startswith(("numpy", "pandas")):
        return f"{module.partition('.')[0]}.{t.__qualname__}"
    return t.__qualname__


def utc(v: dt.datetime) -> dt.datetime:
    """Aware, in UTC; a naive datetime is taken as UTC, as everywhere in featcache."""
    try:
        return v.replace(tzinfo=_UTC, fold=0) if v.utcoffset() is None else v.astimezone(_UTC)
    except OverflowError:
        raise Refused(f"datetime {v} is outside the years 1-9999 in UTC") from None


def walk_items(seq: Sequence[Any], depth: int, each: Each) -> list[Any]:
    """``each`` of every element of a list or tuple one level down."""
    if depth >= MAX_DEPTH:
        raise too_deep()
    out = []
    for i, value in enumerate(seq):
        try:
            out.append(each(value, depth + 1))
        except Refused as e:
            e.path.append(f"[{i}]")
            raise
    return out


def walk_mapping(m: Mapping[Any, Any], depth: int, each: Each, why_str_keys: str = ""
                 ) -> dict[str, Any]:
    """``each`` of every value one level down, under its key as a plain str. A key that is
    not a str, or not UTF-8 text, is refused (``why_str_keys`` says why keys are str)."""
    if depth >= MAX_DEPTH:
        raise too_deep()
    out: dict[str, Any] = {}
    for key, value in m.items():
        k = key
        if type(k) is not str:
            if not isinstance(k, str):
                raise Refused(f"dict key {k!r} ({type_name(k)}) is not a str{why_str_keys}")
            k = str.__str__(k)  # a StrEnum: its text
        if not k.isascii():
            try:
                k.encode("utf-8")
            except UnicodeEncodeError:
                raise Refused(f"dict key {k!r} is not text: it holds a lone surrogate") \
                    from None
        try:
            out[k] = each(value, depth + 1)
        except Refused as e:
            e.path.append(f"[{k!r}]")
            raise
    return out
