"""The prediction cache: model outputs in Redis (and the L1), keyed by a digest of their input.

``FeatureCache.model(name, version)`` gives a ``ModelCache``; ``get_or_compute(inputs, compute)``
answers a batch of inputs in input order, each output with its status (``HIT_L1``,
``HIT_REDIS``, ``COMPUTED``), and calls ``compute`` once with only the inputs nothing had:

1. every input's key is the digest of its canonical encoding (``featcache.model_inputs``) in the
   model version's key space (``featcache.keys.model_space``): the same input gives the same key
   in every process and on every machine;
2. the L1 (when the cache has one and the policy allows it) answers what it holds;
3. ONE Redis read takes the rest and the version's epoch together;
4. the misses go through the process's single flight (threads asking for the same input wait
   for one compute) and through compute leases in Redis (processes too: one takes the lease and
   computes, the others poll for its output, up to ``lease_wait``);
5. ``compute`` runs once with the inputs this call leads, in input order, and the outputs are
   written back fenced: only where the key still holds what the read saw and the version's
   epoch did not move, before a deadline, so an output computed before an invalidation never
   lands after it (the feature fills' rule, ``featcache.redis_store.scripts``).

A value in Redis is a header this module owns, then the output (``featcache.model_outputs``)::

    bytes 0-1    b"P" 0x01: a model output, format 1 (a feature row starts 0x98)
    bytes 2-9    the version's epoch when it was computed (big-endian uint64): a whole-version
                 invalidation moves the epoch, and outputs of another epoch are misses
    bytes 10-17  when it expires, ms since the Unix epoch (big-endian uint64): the L1's soft
                 deadline and XFetch's horizon (Redis expires the key itself, ``ttl``)
    bytes 18-21  how long the compute that made it took, ms (big-endian uint32): XFetch's delta
    then         the output

Anything else found under a key (a tombstone of ``invalidate(inputs)``, bytes of another
format, a truncated value) is a miss, counted under ``decode_errors`` unless it is a tombstone,
and the fence the recomputed output is written against.
"""

from __future__ import annotations

import functools
import logging
import math
import operator
import random
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any, ClassVar, NamedTuple, TypeVar, cast, overload

from featcache.breaker import CircuitBreaker
from featcache.codec import is_tombstone
from featcache.config_sections import (
    Seconds,
    Section,
    duration_field,
    flag_field,
    integer_field,
    number_field,
    parse_duration,
)
from featcache.errors import CacheUnavailable, InvalidRequest, ModelOutputError
from featcache.invalidation import InvalidationReport, Invalidator
from featcache.keys import KeyLayout
from featcache.l1 import L1Cache
from featcache.leases import Leases
from featcache.model_inputs import batch_of, input_digests
from featcache.model_outputs import decode_output, decode_outputs, encode_output
from featcache.outage import OutageLog
from featcache.redis_store import RedisStore, WriteBatch, fenced_write
from featcache.request import EntityId
from featcache.singleflight import BUSY, MISSING, SingleFlight
from featcache.stats import MODEL_EVENTS, MODEL_TIERS, CacheStats
from featcache.steps import Pause, Steps, run_blocking
from featcache.types import Status

__all__ = ["MODEL_EVENTS", "MODEL_TIERS", "Compute", "ModelCache", "ModelCall", "ModelPolicy",
           "ModelResult", "ModelShared"]

log = logging.getLogger("featcache.models")

#: ``compute(inputs) -> outputs``: one output per input, in order (a list, a tuple, a numpy
#: array whose rows are the outputs, a pandas Series...)
Compute = Callable[[list[Any]], Any]

_HEADER = struct.Struct(">2sQQI")
_MAGIC = b"P\x01"
_HEADER_SIZE = _HEADER.size
_EPOCH_HEAD = struct.Struct(">2sQ")  # what every current output of a version starts with
_EXPIRES = struct.Struct(">Q")
_EXPIRES_AT = 10
_PAYLOAD = operator.itemgetter(slice(_HEADER_SIZE, None))
_MAX_DELTA_MS = 2**32 - 1
#: how often a waiter polls for another process's output: from 1 ms, doubling, up to 20 ms
_POLL_FIRST_S = 0.001
_POLL_MAX_S = 0.02

FlightKey = tuple[str, str]  # (key space, digest)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ModelPolicy(Section):
    """How one model version is cached: ``FeatureCache.model(name, version, **policy)``.

    ``ttl``: how long an output stays in Redis. ``early_refresh``: XFetch's beta (0: off); a hit
    is recomputed early with a probability that rises as its expiry nears, scaled by how long
    its compute took, so a hot input is refreshed before it expires instead of by a stampede
    after. ``lease``: take compute leases in Redis, so processes compute a missing input once
    (``lease_ttl`` bounds a lease whose holder died; a waiter computes itself after
    ``lease_wait``). ``l1``: answer from the cache's L1, when it has one (``l1.policy``).
    ``max_inputs``: the most inputs one call takes.
    """

    NAME: ClassVar[str] = "model"

    ttl: Seconds = duration_field(86_400.0)
    early_refresh: float = number_field(0.0)
    lease: bool = flag_field(True)
    lease_ttl: Seconds = duration_field(30.0)
    lease_wait: Seconds = duration_field(5.0, zero=True)
    l1: bool = flag_field(True)
    max_inputs: int = integer_field(100_000, 1, 10_000_000)

    def __post_init__(self) -> None:
        self._check_fields()
        beta = parse_duration(self.early_refresh, "model.early_refresh")  # a number >= 0
        object.__setattr__(self, "early_refresh", beta)


class ModelResult(Sequence[Any]):
    """The outputs of one ``get_or_compute`` call in input order (index it, iterate it), and
    each one's status (``statuses``)."""

    __slots__ = ("outputs", "statuses")

    def __init__(self, outputs: list[Any], statuses: list[Status]) -> None:
        self.outputs = outputs
        self.statuses = statuses

    @overload
    def __getitem__(self, index: int) -> Any: ...

    @overload
    def __getitem__(self, index: slice) -> list[Any]: ...

    def __getitem__(self, index: int | slice) -> Any:
        return self.outputs[index]

    def __len__(self) -> int:
        return len(self.outputs)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.outputs)

    def status_counts(self) -> Counter[Status]:
        """How many outputs came from where."""
        return Counter(self.statuses)

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}={n}" for s, n in self.status_counts().items())
        return f"ModelResult({len(self.outputs)} outputs: {counts})"


class _Got(NamedTuple):
    """One distinct input's answer: the stored output bytes (header stripped), the output
    decoded from them, where it came from, and how long it stays valid (ms since the epoch)."""

    payload: bytes
    output: Any
    status: Status
    expires_ms: int


class ModelCall:
    """One call between its steps (``ModelCache.begin``, the read, ``settle``, ``finish``):
    what the async client carries across its await."""

    __slots__ = ("batch", "begun_ns", "digests", "epoch", "first", "got", "keys", "l1_token",
                 "led", "refresh", "seen", "started", "wanted")

    def __init__(self, batch: Sequence[Any], digests: list[str], first: dict[str, int] | None,
                 begun_ns: int) -> None:
        self.batch = batch
        self.begun_ns = begun_ns  # perf_counter_ns at the call's start: its latency counted
        self.digests = digests
        self.first = first  # digest -> index of its first input; None until ``places()``
        self.got: dict[str, _Got] = {}  # answered so far
        self.wanted: list[str] = []  # distinct digests the L1 did not answer
        self.keys: list[str] = []  # the one read: the epoch key, then wanted's keys
        self.seen: dict[str, bytes] = {}  # what Redis held for a miss: its write's fence
        self.refresh: set[str] = set()  # hits due for an XFetch early refresh
        self.led: set[str] = set()  # the misses this call computed (or fetched) itself
        self.epoch: bytes | None = None  # the version's epoch as read
        self.l1_token = 0
        self.started = time.monotonic()  # before the read: the writes' deadline counts from it

    def places(self) -> dict[str, int]:
        """Each digest's index of its first input. Built when first asked for (the
        call's inputs are distinct then): an all-hit call, the usual one, needs none."""
        if self.first is None:
            self.first = dict(zip(self.digests, range(len(self.digests)), strict=True))
        return self.first


class ModelCache:
    """The outputs of one model version (``FeatureCache.model``); thread-safe, cheap to hold.

    Built from what it needs alone: the Redis store and key layout, the invalidator, the
    read path's breaker and outage log (one Redis, one health), what every model cache of the
    process shares (``ModelShared``) and a wall clock.
    """

    def __init__(
        self,
        model: str,
        version: str,
        space: str,
        policy: ModelPolicy,
        *,
        store: RedisStore,
        layout: KeyLayout,
        invalidator: Invalidator,
        breaker: CircuitBreaker,
        outage: OutageLog,
        shared: ModelShared,
        fill_window: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.model = model
        self.version = version
        self.space = space
        self.policy = policy
        self._store = store
        self._layout = layout
        self._invalidator = invalidator
        self.breaker = breaker
        self._outage = outage
        self._flights = shared.flights
        self._counts = shared.counts
        self._l1 = shared.l1 if policy.l1 else None
        self._fill_window = fill_window
        self._fill_window_us = int(fill_window * 1_000_000)
        self._clock = clock
        self._epoch_key = layout.epoch_key(space)
        self._ttl_ms = max(1, int(policy.ttl * 1000))
        self._leases = Leases(store, layout, max(1, int(policy.lease_ttl * 1000)))

    def __repr__(self) -> str:
        return f"ModelCache({self.model!r}, version={self.version!r})"

    # ------------------------------------------------------------------ the call

    def get_or_compute(self, inputs: Any, compute: Compute) -> ModelResult:
        """Every input's output, in input order, each with its status; ``compute`` is called
        with only the inputs no cache held (once, in input order; a second time only for
        inputs another process was computing and did not deliver within ``lease_wait``).

        ``inputs``: a list or tuple of inputs (dicts of feature values, tuples, numbers,
        strings, numpy arrays...), a ``FeatureResult`` (one input per entity: its features),
        a pandas DataFrame (one per row) or a 2-D numpy array (one per row). Raises
        ``InvalidRequest`` for an input featcache cannot key (before any I/O),
        ``ModelOutputError`` when ``compute`` returns what cannot be stored or not one output
        per input, and whatever ``compute`` raises. Redis failing is never an error: the
        call computes what it could not read.
        """
        if not callable(compute):
            raise InvalidRequest(f"compute must be callable, got {type(compute).__name__}")
        call = self.begin(inputs)
        if isinstance(call, ModelResult):
            return call
        raw, redis_ok = self.read_redis(call)
        done = self.settle(call, raw, redis_ok)
        if done is not None:
            return done
        return self.finish(call, redis_ok, compute)

    def begin(self, inputs: Any) -> ModelCall | ModelResult:
        """Key the inputs and ask the L1: the answer when the L1 holds every one, else the
        call with the keys of its one Redis read (``ModelCall.keys``)."""
        begun_ns = time.perf_counter_ns()
        batch = batch_of(inputs)
        if len(batch) > self.policy.max_inputs:
            raise InvalidRequest(f"{len(batch):,} inputs in one call; model.max_inputs is "
                                 f"{self.policy.max_inputs:,}")
        digests = input_digests(batch)
        wanted = digests
        first: dict[str, int] | None = None
        if len(set(digests)) != len(digests):  # an input repeated: the index of its first place
            first = {}
            for i, digest in enumerate(digests):
                first.setdefault(digest, i)
            wanted = list(first)
        call = ModelCall(batch, digests, first, begun_ns)
        l1 = self._l1
        if l1 is not None and wanted:
            call.l1_token = l1.fill_token()
            held = l1.get_many(self.space, wanted, distinct=True)
            if held:
                for digest, payload in held.items():
                    output = _decoded(payload)
                    if output is not _UNDECODABLE:
                        call.got[digest] = _Got(payload, output, Status.HIT_L1, 0)
                wanted = [d for d in wanted if d not in call.got]
                if not wanted:
                    return self._result(call, "l1", {"hits_l1": len(call.got)})
                self._counts.add_one(self.space, "hits_l1", len(call.got))
        if not wanted:  # an empty batch
            return self._result(call, "l1", {})
        call.wanted = wanted
        call.keys = [self._epoch_key, *self._layout.row_keys(self.space, wanted)]
        return call

    def read_redis(self, call: ModelCall) -> tuple[list[bytes | None], bool]:
        """The call's one Redis read, through the breaker: the values (all None when Redis
        failed) and whether Redis answered."""
        if not self.breaker.allow():
            return self.redis_failed(call, CacheUnavailable("Redis circuit open: read skipped"),
                                     count=False)
        try:
            raw = self._store.read(call.keys)
        except CacheUnavailable as exc:
            return self.redis_failed(call, exc)
        self.redis_succeeded()
        return raw, True

    def redis_succeeded(self) -> None:
        self.breaker.record_success()
        self._outage.ok()

    def redis_failed(self, call: ModelCall, exc: CacheUnavailable, *, count: bool = True
                     ) -> tuple[list[bytes | None], bool]:
        """The read failed (``count``: against the breaker): every input is computed."""
        if count:
            self.breaker.redis_failed(exc)
        self._outage.failed("computing model outputs", exc)
        self._counts.add(self.space, {"redis_errors": 1})
        return [None] * len(call.keys), False

    def settle(self, call: ModelCall, raw: list[bytes | None], redis_ok: bool
               ) -> ModelResult | None:
        """Sort the read's values into hits, misses and early refreshes: the answer when
        nothing needs computing, else None (``finish``)."""
        epoch_raw, rows = raw[0], raw[1:]
        call.epoch = epoch_raw
        epoch = _epoch_of(epoch_raw)
        now_ms = int(self._clock() * 1000)
        beta = self.policy.early_refresh
        if epoch is not None and not beta:
            done = self._all_hits(call, rows, epoch, now_ms)
            if done is not None:
                return done
        hits = undecodable = 0
        missing = False
        for digest, value in zip(call.wanted, rows, strict=True):
            if value is None:
                missing = True
                continue
            got = self._judged(value, epoch, now_ms)
            if not isinstance(got, _Got):
                call.seen[digest] = value
                missing = True
                undecodable += got is _UNDECODABLE
                continue
            call.got[digest] = got
            hits += 1
            if beta and _early(got, value, beta, now_ms):
                call.refresh.add(digest)
                call.seen[digest] = value
        counts = {"hits_redis": hits, "decode_errors": undecodable}
        if missing or call.refresh:
            self._counts.add(self.space, counts)
            return None
        self._to_l1(call, now_ms)
        return self._result(call, "redis", counts)

    def _all_hits(self, call: ModelCall, rows: list[bytes | None], epoch: int, now_ms: int
                  ) -> ModelResult | None:
        """The usual call: every value read is a current output. Checked and decoded by
        C-level passes over the batch (no Python frame per value but the decoder's); None
        when any value is not, for ``settle``'s value-by-value pass to sort out."""
        # The header's fields are big-endian after the magic, so bytes order as the
        # (magic, epoch, expiry) they start with: the least and the greatest value start with
        # this epoch's head only if every value does, and the least then holds the earliest
        # expiry. Two memcmp passes, no object per value.
        # A None (a miss) among them makes min() raise: a comparison with bytes fails, and
        # min() compares every value (one alone, compared with nothing, is checked by type).
        head = _EPOCH_HEAD.pack(_MAGIC, epoch)
        values = cast("list[bytes]", rows)  # until min() says otherwise
        try:
            least = min(values)
        except TypeError:
            return None
        if not (type(least) is bytes and least.startswith(head)
                and max(values).startswith(head)):
            return None
        if len(least) < _HEADER_SIZE or _EXPIRES.unpack_from(least, _EXPIRES_AT)[0] <= now_ms:
            return None  # a value cut short, whose payload would not decode either
        payloads = list(map(_PAYLOAD, values))
        try:
            outputs = decode_outputs(payloads)
        except ValueError:
            return None
        l1 = self._l1
        in_order = len(call.wanted) == len(call.digests)  # no L1 hit, no repeat
        expiries = ([e for (e,) in map(_EXPIRES.unpack_from, values, repeat(_EXPIRES_AT))]
                    if l1 is not None or not in_order else [])
        if l1 is not None:
            l1.put_many(self.space, dict(zip(call.wanted, payloads, strict=True)),
                        token=call.l1_token,
                        fresh_for={d: (e - now_ms) / 1000
                                   for d, e in zip(call.wanted, expiries, strict=True)})
        if in_order:
            self._counts.call(self.space, "hits_redis", len(values), "redis",
                              time.perf_counter_ns() - call.begun_ns)
            return ModelResult(outputs, [Status.HIT_REDIS] * len(outputs))
        for digest, payload, output, expires_ms in zip(call.wanted, payloads, outputs,
                                                       expiries, strict=True):
            call.got[digest] = _Got(payload, output, Status.HIT_REDIS, expires_ms)
        return self._result(call, "redis", {"hits_redis": len(values)})

    def finish(self, call: ModelCall, redis_ok: bool, compute: Compute) -> ModelResult:
        """Compute what no cache held (through the single flight and the leases) and write it
        back, fenced; the answer."""
        return run_blocking(self.finish_steps(call, redis_ok, compute))

    def finish_steps(self, call: ModelCall, redis_ok: bool, compute: Compute
                     ) -> Steps[ModelResult]:
        """``finish`` as steps (``featcache.steps``): it yields where the call waits for
        outputs another caller of this process is computing, and each pause between polls for
        outputs another process is computing, for a driver that waits without a thread."""
        todo = [d for d in call.wanted if d not in call.got or d in call.refresh]
        flight_keys = [(self.space, d) for d in todo]
        refreshing = {(self.space, d) for d in call.refresh}
        results = yield from self._flights.do_many_steps(
            flight_keys,
            lambda lead: self._lead(call, [d for _, d in lead], redis_ok, compute),
            no_wait=refreshing,
        )
        for (_, digest), answer in results.items():
            if answer is BUSY:  # another caller refreshes it: the cached output stands
                continue
            if answer is MISSING:  # cannot happen: the leader answers every key it leads
                raise RuntimeError(f"no output for input digest {digest}")
            call.got[digest] = answer if digest in call.led else _Got(
                # another call's answer: this caller gets its own copy of the output
                answer.payload, _decoded(answer.payload), answer.status, answer.expires_ms)
        self._to_l1(call, int(self._clock() * 1000))
        return self._result(call, "compute", {})

    # ------------------------------------------------------------------ the leader

    def _lead(self, call: ModelCall, lead: list[str], redis_ok: bool, compute: Compute
              ) -> Steps[dict[FlightKey, _Got]]:
        """The process's one fetch of ``lead``: leases, compute, the fenced write, then the
        wait for outputs other processes are computing (and computing what they did not
        deliver)."""
        call.led.update(lead)
        out: dict[str, _Got] = {}
        token = Leases.new_token() if redis_ok and self.policy.lease else ""
        won: list[str] = lead
        held: dict[str, bytes | None] = {}
        deadline_us = 0
        if token:
            try:
                won, held, deadline_us = self._take_leases(call, lead, token, out)
            except CacheUnavailable as exc:
                self._redis_error(exc, "computing without leases")
                token = ""
        epoch = call.epoch
        if redis_ok and epoch is None:
            try:
                epoch = call.epoch = self._redis_call(
                    lambda: self._store.ensure_epochs([self._epoch_key])[0])
            except CacheUnavailable as exc:
                self._redis_error(exc, "computing without writing")
                redis_ok = False
        if won:
            out.update(self._compute_and_write(call, won, compute, epoch if redis_ok else None,
                                               token, deadline_us))
        if held:
            arrived, left = yield from self._wait(call, held, epoch)
            out.update(arrived)
            if left:  # their holders did not deliver: computed here, written unleased
                out.update(self._compute_and_write(call, left, compute, epoch, "", 0))
        return {(self.space, d): got for d, got in out.items()}

    def _take_leases(self, call: ModelCall, lead: list[str], token: str, out: dict[str, _Got]
                     ) -> tuple[list[str], dict[str, bytes | None], int]:
        """Leases on ``lead`` in one round trip: the ones won, the ones other processes hold
        (to wait on), and the writes' deadline on the server's clock. An output that landed
        since the read goes straight into ``out``."""
        wanted: dict[str, list[EntityId]] = {self.space: list(lead)}
        seen: dict[str, dict[EntityId, bytes]] = {
            self.space: {d: call.seen[d] for d in lead if d in call.seen}}
        taken, server_us = self._redis_call(lambda: self._leases.acquire(wanted, seen, token))
        won, held_by, changed = taken[self.space]
        held: dict[str, bytes | None] = {}
        for d, holder in held_by.items():
            if d in call.refresh:  # another process refreshes it: the cached output stands
                out[str(d)] = call.got[str(d)]
            else:
                held[str(d)] = holder
        epoch = _epoch_of(call.epoch)
        now_ms = int(self._clock() * 1000)
        for d, value in changed.items():
            digest = str(d)
            got = self._usable(value, epoch, now_ms)
            if got is not None:  # another process's output landed since the read
                out[digest] = got
            else:  # changed under us (a tombstone, another output): its fence, and wait
                call.seen[digest] = value
                held[digest] = None
        # the read (the fence) ran at most the time since the call started before the
        # leases' TIME: that far back, plus the fill window, on the server's clock
        since_start_us = int((time.monotonic() - call.started) * 1e6)
        return [str(d) for d in won], held, server_us - since_start_us + self._fill_window_us

    def _compute_and_write(self, call: ModelCall, digests: list[str], compute: Compute,
                           epoch: bytes | None, token: str, deadline_us: int
                           ) -> dict[str, _Got]:
        """``compute`` of these inputs (in input order), and the fenced write of the outputs
        (none when ``epoch`` is None: Redis is not answering). The leases taken under
        ``token`` are released by the write, or at once when compute fails."""
        first = call.places()
        digests = sorted(digests, key=first.__getitem__)  # input order, whatever the slots'
        release = self._leases.keys(self.space, digests) if token else []
        inputs = [call.batch[first[d]] for d in digests]
        began = time.monotonic()
        try:
            outputs = compute(inputs)
            payloads = _encoded(outputs, len(inputs))
        except BaseException:
            if release:
                self._release(release, token)
            raise
        took_ms = min(_MAX_DELTA_MS, int((time.monotonic() - began) * 1000))
        now_ms = int(self._clock() * 1000)
        expires_ms = now_ms + self._ttl_ms
        self._counts.add(self.space, {"computed": len(digests), "compute_calls": 1,
                                      "refreshed": len(call.refresh.intersection(digests))})
        out = {d: _Got(p, _decoded(p), Status.COMPUTED, expires_ms)
               for d, p in zip(digests, payloads, strict=True)}
        if epoch is None:  # Redis is not answering: nothing written, leases given back
            if release:
                self._release(release, token)
            return out
        if time.monotonic() - call.started > self._fill_window:
            # past the window a tombstone the read raced with may have expired: not written
            self._counts.add(self.space, {"writes_late": len(digests)})
            if release:
                self._release(release, token)
            return out
        stamp = _HEADER.pack(_MAGIC, _epoch_of(epoch) or 0, expires_ms, took_ms)
        keys = self._layout.row_keys(self.space, digests)
        items = [fenced_write(key, stamp + payload, self._ttl_ms, call.seen.get(d))
                 for key, d, payload in zip(keys, digests, payloads, strict=True)]
        batch = WriteBatch(self._epoch_key, epoch, items, release, token, deadline_us)
        try:
            written = self._redis_call(lambda: self._store.write([batch]))
        except CacheUnavailable as exc:
            self._redis_error(exc, "outputs not written")
        else:
            self._counts.add(self.space, {"written": written,
                                          "writes_fenced": len(items) - written})
        return out

    def _wait(self, call: ModelCall, held: dict[str, bytes | None], epoch_raw: bytes | None
              ) -> Steps[tuple[dict[str, _Got], list[str]]]:
        """Poll for the outputs other processes hold the leases of, up to ``lease_wait``:
        what arrived, and what this call must compute (the holder's lease is gone with no
        output there, or the wait ran out)."""
        epoch = _epoch_of(epoch_raw)
        deadline = time.monotonic() + self.policy.lease_wait
        pause = _POLL_FIRST_S
        arrived: dict[str, _Got] = {}
        left: list[str] = []
        waiting = list(held)
        self._counts.add(self.space, {"lease_waits": len(waiting)})
        while waiting:
            yield Pause(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, _POLL_MAX_S)
            keys = [*self._layout.row_keys(self.space, waiting),
                    *self._leases.keys(self.space, waiting)]
            try:
                values = self._redis_call(functools.partial(self._store.read, keys))
            except CacheUnavailable as exc:
                self._redis_error(exc, "computing what it waited for")
                break
            rows, leases = values[: len(waiting)], values[len(waiting):]
            now_ms = int(self._clock() * 1000)
            still: list[str] = []
            for digest, row, lease in zip(waiting, rows, leases, strict=True):
                got = self._usable(row, epoch, now_ms) if row is not None else None
                if got is not None and row != call.seen.get(digest):
                    arrived[digest] = got
                elif lease is None:  # the holder's output will not land
                    if row is not None:
                        call.seen[digest] = row
                    else:
                        call.seen.pop(digest, None)
                    left.append(digest)
                else:
                    still.append(digest)
            waiting = still
            if time.monotonic() >= deadline:
                break
        self._counts.add(self.space, {"lease_timeouts": len(waiting)})
        return arrived, [*left, *waiting]

    # ------------------------------------------------------------------ invalidation

    def invalidate(self, inputs: Any = None) -> InvalidationReport:
        """Drop this model version's outputs: every one (``inputs`` None: the version's epoch
        moves, O(1)) or those of these inputs (tombstones). Every process's L1 drops them
        through the invalidation stream, this one's at once. An output computed before this
        returns is never written after it."""
        if inputs is None:
            report = self._invalidator.fence_all(self.space)
            if self._l1 is not None:
                self._l1.invalidate_view(self.space)
            return report
        digests = list(dict.fromkeys(input_digests(batch_of(inputs))))
        report = self._invalidator.fence_ids(self.space, list(digests))
        if self._l1 is not None:
            self._l1.invalidate(self.space, digests)
        return report

    def keys_of(self, inputs: Any) -> list[str]:
        """The Redis keys of these inputs' outputs (to inspect them; nothing is read)."""
        return self._layout.row_keys(self.space, input_digests(batch_of(inputs)))

    def stats(self) -> dict[str, int]:
        """This process's counts for this model version (every ``ModelCache`` of it)."""
        return self._counts.of(self.space)

    # ------------------------------------------------------------------ internals

    def _usable(self, value: bytes, epoch: int | None, now_ms: int) -> _Got | None:
        """The output a stored value holds, if it is of the current epoch and not expired."""
        got = self._judged(value, epoch, now_ms)
        return got if isinstance(got, _Got) else None

    def _judged(self, value: bytes, epoch: int | None, now_ms: int) -> _Got | _Undecodable | None:
        """``_usable``, telling bytes that are neither a tombstone nor a whole output of the
        current epoch (``_UNDECODABLE``, a decode error) from a miss (None: a tombstone, an
        output of another epoch, or expired)."""
        if not _is_output(value):
            return None if is_tombstone(value) else _UNDECODABLE
        if epoch is None:
            return None
        _, stamped, expires_ms, _ = _HEADER.unpack_from(value)
        if stamped != epoch or expires_ms <= now_ms:
            return None
        payload = value[_HEADER_SIZE:]
        output = _decoded(payload)
        if output is _UNDECODABLE:
            return _UNDECODABLE  # type: ignore[no-any-return]
        return _Got(payload, output, Status.HIT_REDIS, expires_ms)

    def _to_l1(self, call: ModelCall, now_ms: int) -> None:
        """Outputs read or computed by this call go to the L1, each until its expiry."""
        l1 = self._l1
        if l1 is None:
            return
        fresh = {d: g for d, g in call.got.items() if g.status is not Status.HIT_L1}
        if fresh:
            l1.put_many(self.space, {d: g.payload for d, g in fresh.items()},
                        token=call.l1_token,
                        fresh_for={d: max(0.0, (g.expires_ms - now_ms) / 1000)
                                   for d, g in fresh.items()})

    def _result(self, call: ModelCall, tier: str, counts: dict[str, int]) -> ModelResult:
        """Outputs in input order (an input repeated in the batch gets its own copy); counts
        ``counts`` and the call, answered by ``tier`` (``MODEL_TIERS``)."""
        self._counts.add_call(self.space, counts, tier, time.perf_counter_ns() - call.begun_ns)
        got, first = call.got, call.places()
        outputs: list[Any] = []
        statuses: list[Status] = []
        for i, digest in enumerate(call.digests):
            answer = got[digest]
            outputs.append(answer.output if first[digest] == i else _decoded(answer.payload))
            statuses.append(answer.status)
        return ModelResult(outputs, statuses)

    def _redis_call(self, fn: Callable[[], T]) -> T:
        """One round trip through the breaker the read path shares."""
        return self.breaker.redis_call(f"model {self.model}", fn)

    def _redis_error(self, exc: CacheUnavailable, consequence: str) -> None:
        self._outage.failed(consequence, exc)
        self._counts.add(self.space, {"redis_errors": 1})

    def _release(self, keys: list[str], token: str) -> None:
        """Give leases back now (compute failed, or the write is not sent): waiters take
        over at their next poll instead of at ``lease_wait``."""
        batch = WriteBatch(self._epoch_key, None, (), keys, token)
        try:
            self._redis_call(lambda: self._store.write([batch]))
        except CacheUnavailable as exc:  # lease_ttl bounds them
            self._redis_error(exc, "leases left to expire")


class ModelShared:
    """What every ``ModelCache`` of a process shares: the single flight of computes (two
    ``ModelCache`` objects of one version are one cache), the counters (per model version key
    space, published with the views' for ``featcache stats`` and read by Prometheus), and the
    L1 of model outputs (None without one), which the invalidation stream's tail reaches."""

    def __init__(self, l1: L1Cache[bytes] | None) -> None:
        self.flights: SingleFlight[FlightKey, _Got] = SingleFlight()
        self.counts = CacheStats(MODEL_EVENTS)
        self.l1 = l1


class _Undecodable:
    """What ``_decoded`` returns for bytes that are not an output (None is an output)."""


_UNDECODABLE: Any = _Undecodable()


def _decoded(payload: bytes) -> Any:
    try:
        return decode_output(payload)
    except ValueError:
        return _UNDECODABLE


def _is_output(value: bytes) -> bool:
    return len(value) >= _HEADER_SIZE and value[:2] == _MAGIC


def _epoch_of(raw: bytes | None) -> int | None:
    """The version's epoch as read (None: no epoch yet, so no stored output is current)."""
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        return None


def _early(got: _Got, value: bytes, beta: float, now_ms: int) -> bool:
    """XFetch (Vattani et al.): recompute ahead of expiry with a probability that rises as
    the expiry nears, faster for outputs that took long to compute."""
    delta_ms: int = _HEADER.unpack_from(value)[3]
    return now_ms - delta_ms * beta * math.log(1.0 - random.random()) >= got.expires_ms


def _encoded(outputs: Any, expected: int) -> list[bytes]:
    """Each output's bytes; ``ModelOutputError`` unless there is exactly one per input."""
    try:
        count = len(outputs)
    except TypeError:
        raise ModelOutputError(
            f"compute must return one output per input (a list, a tuple, an array...), got "
            f"{type(outputs).__name__}") from None
    if count != expected or isinstance(outputs, str | bytes | dict):
        raise ModelOutputError(
            f"compute returned {count} outputs for {expected} inputs"
            if count != expected else
            f"compute must return a sequence of outputs, got {type(outputs).__name__}")
    items: Iterable[Any] = outputs
    return [_encode_one(output, i) for i, output in enumerate(items)]


def _encode_one(output: Any, index: int) -> bytes:
    try:
        return encode_output(output)
    except ModelOutputError as exc:
        text = str(exc)  # "output['scores'][2]: ..." names the place within one output
        place = text[len("output"):] if text.startswith("output") else f": {text}"
        raise ModelOutputError(f"outputs[{index}]{place}") from None
