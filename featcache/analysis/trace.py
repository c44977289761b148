"""``Trace``: the entity ids one view was read with, in access order; ``sample`` thins one.

A trace is what the analysis works on: the ids (ints or strs, as the view declares them), the
time of each access in seconds when known, and the rate it was sampled at (1.0: every access;
less: the accesses of the ids ``featcache.analysis.sampling`` keeps at that rate). The ids are
held as one numpy array, so a trace of ten million accesses costs 80 MB, not a list of
objects; their dense codes (0 .. distinct - 1) are computed once, on first use.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from featcache.analysis.sampling import sampled, threshold
from featcache.errors import InvalidRequest

__all__ = ["Trace", "sample"]

_INT64_MAX = np.iinfo(np.int64).max


@dataclass(frozen=True, eq=False)
class Trace:
    """The accesses of one view, in order. Build it with ``Trace.of`` from any sequences.

    ``ids``: an int64 array, or an object array of str. ``timestamps``: seconds (any epoch),
    non-decreasing, one per access, or None. ``sampling_rate``: 1.0 for a full trace.
    ``full_accesses``: for a sample, the accesses of the whole trace it was drawn from, when
    known (SHARDS' adjusted estimate uses it).
    """

    view: str
    ids: npt.NDArray[Any]
    timestamps: npt.NDArray[np.float64] | None = None
    sampling_rate: float = 1.0
    full_accesses: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.view, str) or not self.view:
            raise InvalidRequest(f"a trace needs a view name, got {self.view!r}")
        threshold(self.sampling_rate)  # raises for a rate outside (0, 1]
        ids = _as_ids(self.ids, self.view)
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "sampling_rate", float(self.sampling_rate))
        if self.timestamps is not None:
            object.__setattr__(self, "timestamps", _as_timestamps(self.timestamps, len(ids)))
        if self.full_accesses is not None and self.full_accesses < len(ids):
            raise InvalidRequest(f"full_accesses ({self.full_accesses}) is less than the "
                                 f"trace's own {len(ids)} accesses")

    @classmethod
    def of(
        cls,
        view: str,
        ids: Sequence[int] | Sequence[str] | npt.NDArray[Any],
        timestamps: Sequence[float] | npt.NDArray[Any] | None = None,
        sampling_rate: float = 1.0,
        full_accesses: int | None = None,
    ) -> Trace:
        """A trace from lists or arrays (checked and converted as ``Trace`` holds them)."""
        return cls(
            view,
            np.asarray(ids),
            None if timestamps is None else np.asarray(timestamps, dtype=np.float64),
            sampling_rate,
            full_accesses,
        )

    def __len__(self) -> int:
        return len(self.ids)

    @functools.cached_property
    def _factorized(self) -> tuple[npt.NDArray[Any], npt.NDArray[np.int64]]:
        uniques, codes = np.unique(self.ids, return_inverse=True)
        return uniques, codes.astype(np.int64, copy=False).reshape(-1)

    @property
    def codes(self) -> npt.NDArray[np.int64]:
        """Each access's id as a dense code, 0 .. distinct - 1 (ids in sorted order)."""
        return self._factorized[1]

    @property
    def distinct_ids(self) -> npt.NDArray[Any]:
        """The distinct ids, sorted; ``distinct_ids[codes]`` is ``ids``."""
        return self._factorized[0]

    @property
    def distinct(self) -> int:
        """How many distinct ids the trace reads."""
        return len(self._factorized[0])

    @property
    def is_full(self) -> bool:
        """Every access, not a sample."""
        return self.sampling_rate == 1.0


def sample(trace: Trace, rate: float) -> Trace:
    """The accesses of ``trace`` whose ids a trace sampled at ``trace.sampling_rate * rate``
    keeps (``rate`` is relative to the trace's own; the same hash at both rates keeps a
    subset, so sampling a sample is sampling the whole at the product).

    Each distinct id is hashed once. Raises ``InvalidRequest`` if no access is kept.
    """
    threshold(rate)
    absolute = trace.sampling_rate * rate
    if absolute == trace.sampling_rate:
        return trace
    view = trace.view
    uniques = trace.distinct_ids.tolist()  # Python ints or strs: spelled as the keys spell them
    keep_id = np.fromiter((sampled(view, entity, absolute) for entity in uniques),
                          dtype=bool, count=len(uniques))
    keep = keep_id[trace.codes]
    if not keep.any():
        raise InvalidRequest(
            f"sampling view {view!r} at rate {absolute:g} kept none of its {trace.distinct:,} "
            f"ids; use a higher rate or a longer trace"
        )
    full = trace.full_accesses if trace.full_accesses is not None else (
        len(trace) if trace.is_full else None)
    return Trace(
        view,
        trace.ids[keep],
        None if trace.timestamps is None else trace.timestamps[keep],
        absolute,
        full,
    )


def _as_ids(values: Any, view: str) -> npt.NDArray[Any]:
    ids = np.asarray(values)
    if ids.ndim != 1:
        raise InvalidRequest(f"view {view!r}: a trace's ids must be one sequence, "
                             f"got an array of shape {ids.shape}")
    if len(ids) == 0:
        raise InvalidRequest(f"view {view!r}: the trace is empty (no accesses)")
    kind = ids.dtype.kind
    if kind == "i":
        return ids.astype(np.int64, copy=False)
    if kind == "u":
        if int(ids.max()) > _INT64_MAX:
            raise InvalidRequest(f"view {view!r}: an entity id is beyond the 64-bit range")
        return ids.astype(np.int64)
    if kind in "OU":
        ids = ids.astype(object, copy=False)
        types = set(map(type, ids))
        if types == {str}:
            return ids
        if types <= {int}:
            return _as_ids(ids.astype(np.int64), view)
    raise InvalidRequest(
        f"view {view!r}: entity ids must be all ints or all strs, got "
        f"{_kinds(ids)}"
    )


def _kinds(ids: npt.NDArray[Any]) -> str:
    if ids.dtype.kind == "O":
        return ", ".join(sorted({type(value).__name__ for value in ids}))
    return f"values of dtype {ids.dtype}"


def _as_timestamps(values: Any, accesses: int) -> npt.NDArray[np.float64]:
    try:
        ts = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidRequest("timestamps must be numbers (seconds)") from None
    if ts.shape != (accesses,):
        raise InvalidRequest(f"{ts.size} timestamps for {accesses} accesses")
    if not np.isfinite(ts).all():
        raise InvalidRequest("a timestamp is missing, NaN or infinite")
    if accesses > 1 and (np.diff(ts) < 0).any():
        raise InvalidRequest("timestamps must not decrease along the trace (access order)")
    return ts
