"""Machinery shared by the benchmarks: the Redis target, interleaved timing, summaries, the
command line and the output.

Timing rules, the same for every benchmark:

* every case of a comparison runs in the same process against the same server, interleaved:
  each round runs every case once, in rotating order, so drift and noise (other processes, the
  VM's scheduler, the allocator) hit all cases alike. The rotation is a Williams design, not a
  plain cyclic shift: over a cycle of rounds every case runs in every position and right after
  every other case equally often. A plain shift keeps each case's predecessor fixed, and a case
  that leaves the machine "cold" (1000 sequential round trips, say) then always taxes the same
  neighbour: measured here, that alone moved one ratio from 1.9x to 1.4x;
* each sample is one call on a fresh input, prepared untimed (``Case.prepare``), timed with
  ``time.perf_counter_ns``; what the call returns is dropped after the clock stops;
* every case is warmed up before timing; the garbage collector stays on (users have it on),
  with one ``gc.collect()`` before the timed rounds so no earlier garbage is charged to them,
  then ``gc.freeze()`` until they end: the harness's own long-lived data (datasets, expected
  answers, keys) moves to the permanent generation, as a serving process's start-up state does
  when it calls ``gc.freeze()`` after loading. Collections still run, triggered by what the
  timed calls allocate, but a full one no longer scans the benchmark's fixtures: at batch 1000
  of ``bench read``, 15 full collections of that heap (a few ms each) landed in 2,424 calls and
  alone decided the p99 of whichever cases they hit.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import secrets
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis

from featcache.embedded import EmbeddedServer

# --------------------------------------------------------------------------------------------
# Redis target
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RedisTarget:
    """Where a benchmark's keys live. ``private``: a throw-away server this run started."""

    url: str
    prefix: str
    private: bool


@contextlib.contextmanager
def redis_target(url: str | None, private_prefix: str = "fc") -> Iterator[RedisTarget]:
    """A private embedded Valkey (``url`` None), or the given server under a unique prefix.

    On a given server, every key this run writes is under ``fcbench-<hex>:`` and exactly those
    keys are removed afterwards (SCAN + UNLINK); nothing is ever flushed.
    """
    if url is None:
        with EmbeddedServer() as server:
            yield RedisTarget(server.url, private_prefix, private=True)
        return
    target = RedisTarget(url, f"fcbench-{secrets.token_hex(4)}", private=False)
    try:
        yield target
    finally:
        client = redis.Redis.from_url(url)
        try:
            unlink_matching(client, f"{target.prefix}:*")
        finally:
            client.close()


def unlink_matching(client: redis.Redis, pattern: str, batch_size: int = 500) -> int:
    """UNLINK every key matching ``pattern`` (SCAN, never KEYS/FLUSH*); returns how many."""
    removed = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) >= batch_size:
            removed += int(client.unlink(*batch))
            batch.clear()
    if batch:
        removed += int(client.unlink(*batch))
    return removed


def server_description(client: redis.Redis) -> str:
    """``valkey 8.1.8`` / ``redis 7.2.4``, from INFO server."""
    info = client.info("server")
    name = str(info.get("server_name") or "redis")
    version = info.get(f"{name}_version") or info.get("redis_version", "?")
    return f"{name} {version}"


def parser_name(client: redis.Redis) -> str:
    """The response parser class redis-py uses for this client (``_HiredisParser`` wanted)."""
    conn = client.connection_pool.make_connection()
    try:
        return type(conn._parser).__name__  # type: ignore[attr-defined]
    finally:
        conn.disconnect()  # type: ignore[no-untyped-call]


def used_memory(client: redis.Redis) -> dict[str, int]:
    info = client.info("memory")
    return {
        "used_memory": int(info["used_memory"]),
        "mem_clients_normal": int(info.get("mem_clients_normal", 0)),
    }


def server_cpu_seconds(client: redis.Redis) -> float:
    """CPU seconds the server has used so far, all its threads (``INFO cpu``)."""
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def settled_used_memory(
    client: redis.Redis, *, timeout_s: float = 60.0, poll_s: float = 0.5
) -> dict[str, int]:
    """``used_memory`` once the server's keyspace has settled: polled until it stops falling.

    A bulk write leaves the keyspace's hash tables mid-resize: the old table lives on until
    the server's incremental rehashing (a little per command and per cron tick) has moved
    every entry. Measured right after 1M rows went into Valkey 8.1, that was 194 B/row,
    falling to 184 B/row within ~8 s of idling. Per-row memory is the steady state's, so the
    figure waits for it (never longer than ``timeout_s``; bench materialize reports the wait).
    """
    deadline = time.monotonic() + timeout_s
    last = used_memory(client)
    while time.monotonic() < deadline:
        time.sleep(poll_s)
        now = used_memory(client)
        if now["used_memory"] >= last["used_memory"] - 1024:  # no longer falling
            return now
        last = now
    return last


# --------------------------------------------------------------------------------------------
# Interleaved timing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One thing to time. ``run(input)`` is timed; ``prepare``/``verify`` run untimed around it.

    ``verify(input, output)`` raises when a sample did not measure what it claims (a "hit" case
    that missed...), so a broken setup cannot produce a plausible-looking figure.
    """

    name: str
    run: Callable[[Any], object]
    prepare: Callable[[Any], None] | None = None
    verify: Callable[[Any, object], None] | None = None


@dataclass(frozen=True)
class Schedule:
    """How long to run one comparison: ``rounds`` timed rounds, stopping early (never before
    ``min_rounds``) once ``budget_s`` seconds have passed."""

    rounds: int
    warmup_rounds: int
    budget_s: float
    min_rounds: int = 30


@dataclass
class Samples:
    """Nanosecond samples per case name (the same count for every case), and how many garbage
    collections per generation ran during the timed rounds (they land in some samples)."""

    by_case: dict[str, list[int]]
    gc_collections: list[int]
    seconds: float

    @property
    def rounds(self) -> int:
        return len(next(iter(self.by_case.values())))


def run_interleaved(
    cases: Sequence[Case], make_input: Callable[[], Any], schedule: Schedule,
    *, freeze: bool = True,
) -> Samples:
    """Time every case once per round, in balanced orders. ``freeze``: under ``frozen_heap``;
    without it the collector runs as in a serving process that never froze its heap."""
    orders = williams_orders(len(cases))
    for r in range(schedule.warmup_rounds):
        for i in orders[r % len(orders)]:
            time_call(cases[i], make_input())
    by_case: dict[str, list[int]] = {case.name: [] for case in cases}
    with frozen_heap() if freeze else contextlib.nullcontext():
        gc_before = [g["collections"] for g in gc.get_stats()]
        started = time.perf_counter()
        deadline = started + schedule.budget_s
        for r in range(schedule.rounds):
            for i in orders[r % len(orders)]:
                by_case[cases[i].name].append(time_call(cases[i], make_input()))
            if r + 1 >= schedule.min_rounds and time.perf_counter() > deadline:
                break
    gc_runs = [g["collections"] - b for g, b in zip(gc.get_stats(), gc_before, strict=True)]
    return Samples(by_case, gc_runs, time.perf_counter() - started)


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """``gc.collect()``, then ``gc.freeze()`` until the block ends (see the module docstring):
    what the harness holds is never scanned by a collection that a timed call triggers."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def williams_orders(n: int) -> list[list[int]]:
    """Orders of ``n`` cases, balanced for position and for immediate predecessor.

    Rows are cyclic shifts of 0, 1, n-1, 2, n-2, ...; for odd ``n`` the mirrored rows are
    added, which is what it takes to balance predecessors (Williams, 1949).
    """
    if n <= 1:
        return [list(range(n))]
    base = [0]
    low, high = 1, n - 1
    while len(base) < n:
        base.append(low)
        low += 1
        if len(base) < n:
            base.append(high)
            high -= 1
    rows = [[(b + shift) % n for b in base] for shift in range(n)]
    if n % 2:
        rows += [row[::-1] for row in rows]
    return rows


def time_call(case: Case, value: Any) -> int:
    """One timed call of ``case`` in nanoseconds: prepared before and verified after the clock,
    its answer freed after the clock stopped (the same for every case)."""
    if case.prepare is not None:
        case.prepare(value)
    run = case.run
    start = time.perf_counter_ns()
    out = run(value)
    elapsed = time.perf_counter_ns() - start
    if case.verify is not None:
        case.verify(value, out)
    del out  # freed after the clock stopped, the same for every case
    return elapsed


# --------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[int], q: float) -> int:
    """Nearest-rank percentile (``q`` in 0..1) of an ascending sequence."""
    if not sorted_values:
        raise ValueError("no samples")
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass(frozen=True)
class Summary:
    case: str
    batch: int
    p50_us: float
    p99_us: float
    n: int

    @classmethod
    def of(cls, case: str, batch: int, samples_ns: Sequence[int]) -> Summary:
        ordered = sorted(samples_ns)
        return cls(
            case=case,
            batch=batch,
            p50_us=round(percentile(ordered, 0.50) / 1000, 2),
            p99_us=round(percentile(ordered, 0.99) / 1000, 2),
            n=len(ordered),
        )


@dataclass(frozen=True)
class Ratio:
    case: str
    batch: int
    baseline: str
    p50_ratio: float
    p99_ratio: float


def ratios_to(baseline: str, summaries: Sequence[Summary]) -> list[Ratio]:
    base = {s.batch: s for s in summaries if s.case == baseline}
    out = []
    for s in summaries:
        b = base.get(s.batch)
        if b is None:
            continue
        out.append(
            Ratio(s.case, s.batch, baseline, round(s.p50_us / b.p50_us, 3),
                  round(s.p99_us / b.p99_us, 3))
        )
    return out


@dataclass(frozen=True)
class Target:
    """A stated performance target and whether this run met it."""

    name: str
    passed: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'}  {self.name}: {self.detail}"


@dataclass
class Report:
    """What a benchmark writes as JSON; ``extra`` holds benchmark-specific figures."""

    cases: list[Summary]
    ratios: list[Ratio]
    server: str
    quick: bool
    targets: list[Target] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "cases": [asdict(s) for s in self.cases],
            **self.extra,
            "server": self.server,
            "quick": self.quick,
            "ratios": [asdict(r) for r in self.ratios],
            "targets": [asdict(t) for t in self.targets],
            "environment": environment(),
        }

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")


def environment() -> dict[str, Any]:
    import hiredis  # noqa: PLC0415 - only to report its version

    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "redis_py": redis.__version__,
        "hiredis": getattr(hiredis, "__version__", "?"),
        "gc_enabled": gc.isenabled(),
        "gc_frozen_during_timed_rounds": True,  # see the module docstring
    }


def format_table(summaries: Sequence[Summary], ratios: Sequence[Ratio], baseline: str) -> str:
    by_key = {(r.case, r.batch): r for r in ratios}
    header = ("case", "batch", "p50_us", "p99_us", "n", f"p50 vs {baseline}")
    rows = [header]
    for s in summaries:
        r = by_key.get((s.case, s.batch))
        rows.append((
            s.case, str(s.batch), f"{s.p50_us:,.1f}", f"{s.p99_us:,.1f}", str(s.n),
            f"{r.p50_ratio:.2f}x" if r else "-",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for i, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:],
                                                                       strict=True)]
        lines.append("  ".join(cells))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def ms(ns: float) -> float:
    """Nanoseconds as milliseconds, rounded to hundredths."""
    return round(ns / 1e6, 2)


def ms_stats(values_ns: Sequence[int]) -> dict[str, Any]:
    """``n``, ``min``, ``p50``, ``p99`` and ``max`` in ms of nanosecond samples (just ``n``
    when there are none)."""
    if not values_ns:
        return {"n": 0}
    ordered = sorted(values_ns)
    return {
        "n": len(ordered),
        "min": ms(ordered[0]),
        "p50": ms(percentile(ordered, 0.50)),
        "p99": ms(percentile(ordered, 0.99)),
        "max": ms(ordered[-1]),
    }


def format_ms_table(rows: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    """One line per ``(label, ms_stats(...))``."""
    header = ("", "n", "min_ms", "p50_ms", "p99_ms", "max_ms")
    table: list[tuple[str, ...]] = [header]
    for name, s in rows:
        table.append((name, str(s.get("n", 0)),
                      *(f"{s[k]:,.2f}" if k in s else "-" for k in ("min", "p50", "p99", "max"))))
    return aligned(table)


def aligned(table: Sequence[Sequence[str]]) -> str:
    """Rows of cells as text: the first row a header underlined, the first column left-aligned
    and the others right-aligned."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = []
    for i, row in enumerate(table):
        lines.append("  ".join([row[0].ljust(widths[0]),
                                *(c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True))]))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Command line and run context
# --------------------------------------------------------------------------------------------


class BenchError(RuntimeError):
    """The setup does not measure what it claims (an L1 hit that missed, a lost worker...)."""


def add_common_arguments(parser: argparse.ArgumentParser, quick_help: str) -> None:
    """``--json``, ``--quick``, ``--redis-url`` and ``--seed``, as every Redis benchmark has."""
    parser.add_argument("--json", metavar="OUT.json", help="write the results here as JSON")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--redis-url", metavar="URL",
                        help="use this server (keys under a unique fcbench-<hex> prefix, removed "
                             "afterwards) instead of a private embedded Valkey")
    parser.add_argument("--seed", type=int, default=20_260_101, help="data and id sampling seed")


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


#: the CPU probe's work: a pure-Python loop, what the client's share of every case is made of
_PROBE_EXPONENT = 6
_PROBE_ROUNDS = 5
#: what the probe times, as the JSON and the printout name it
PROBE_WHAT = f"sum(range(10**{_PROBE_EXPONENT})), best of {_PROBE_ROUNDS}"


def cpu_probe_ms() -> float:
    """Milliseconds for ``sum(range(10**6))``, the best of 5: how fast this machine runs
    Python right now. A VM's speed moves between phases (docs/benchmarks.md, "The machine"),
    and the client's CPU moves with it more than a round trip to the server does, so every
    run records the probe beside its ratios."""
    best = float("inf")
    for _ in range(_PROBE_ROUNDS):
        start = time.perf_counter()
        sum(range(10**_PROBE_EXPONENT))
        best = min(best, time.perf_counter() - start)
    return round(best * 1000, 2)


def load_and_speed(load_before: Sequence[float], probe_before: float) -> dict[str, Any]:
    """The machine's load average and ``cpu_probe_ms`` at a run's start (given) and now: the
    fields every benchmark's JSON records about the minutes it ran in."""
    return {
        "load_average_1_5_15": {"start": [round(x, 2) for x in load_before],
                                "end": [round(x, 2) for x in os.getloadavg()]},
        "cpu_probe_ms": {"what": PROBE_WHAT, "start": probe_before, "end": cpu_probe_ms()},
    }


@dataclass(frozen=True)
class RunContext:
    """What a run records about where and when it ran: the server, the machine's load and
    its speed (``cpu_probe_ms``) at the start and the end."""

    target: RedisTarget
    server: str
    started: float  # time.perf_counter()
    load_before: tuple[float, float, float]
    probe_before: float  # cpu_probe_ms() before the server started

    def setup(self, seed: int) -> dict[str, Any]:
        """The ``setup`` fields every benchmark's JSON shares (it adds its own)."""
        return {
            "redis": "private embedded server" if self.target.private else "given --redis-url",
            "key_prefix": self.target.prefix,
            "seed": seed,
            "seconds": round(time.perf_counter() - self.started, 1),
            "cpus": os.cpu_count(),
            **load_and_speed(self.load_before, self.probe_before),
        }

    def header(self, title: str, quick: bool, setup: Mapping[str, Any]) -> str:
        """The first line of a benchmark's printout."""
        load = setup["load_average_1_5_15"]
        probe = setup["cpu_probe_ms"]
        return (f"{title}: {self.server} ({setup['redis']}); {'quick' if quick else 'full'} "
                f"run; {os.cpu_count()} CPUs, load average {load['start'][0]:.1f} at start, "
                f"{load['end'][0]:.1f} at end; {probe['what']}: {probe['start']:.1f} ms at "
                f"start, {probe['end']:.1f} at end")


@contextlib.contextmanager
def run_context(url: str | None) -> Iterator[RunContext]:
    """``redis_target(url)``, with the clock, the load average and the CPU probe taken
    before it starts."""
    started = time.perf_counter()
    load_before = os.getloadavg()
    probe_before = cpu_probe_ms()
    with redis_target(url) as target:
        yield RunContext(target, describe_server(target.url), started, load_before,
                         probe_before)


def describe_server(url: str) -> str:
    """``server_description`` of the server at ``url``, on a client opened for it alone."""
    client = redis.Redis.from_url(url)
    try:
        return server_description(client)
    finally:
        client.close()


def finish(report: Report, json_path: str | None, started: float) -> int:
    """Print the report's targets, write its JSON if asked: the end of every benchmark's run."""
    print()
    for t in report.targets:
        print(t.line())
    if json_path:
        report.write(json_path)
        print(f"\nwrote {json_path}")
    log(f"done in {time.perf_counter() - started:.1f} s")
    return 0


def log(message: str) -> None:
    """Progress on stderr, so stdout holds only the results."""
    print(message, file=sys.stderr, flush=True)
