"""``python -m bench serve``: the asyncio client and the HTTP server, against their floors.

In-process, on one uvloop event loop, interleaved as ``bench read`` interleaves (Williams
orders, fresh ids per sample, every row in Redis), at batches of 1, 100 and 1000 ids:

``floor_mget_async``  ``await redis.asyncio.Redis.mget(keys)`` of keys holding random bytes of
                      the size of featcache's row for the same id: redis-py's asyncio client
                      and hiredis, the floor of an asyncio read
``async_hit``         ``await AsyncFeatureCache.get_features(ids, <the 10 features>)``
``featcache_hit``     ``FeatureCache.get_features`` (synchronous), called from the same loop
``async_miss``        ``async_hit`` with every row of the batch UNLINKed first (untimed): the
                      fill runs in the client's thread pool (SQLite, one query, the fenced
                      write back)
``featcache_miss``    the same miss on the synchronous client: the difference is what running
                      fills in a pool costs, beside the SQL read itself

Over HTTP, four server processes on loopback, each a uvicorn worker (uvloop, httptools)
running Starlette, and a load generator in this process (keep-alive connections, each sending
its next request as soon as the last answer is read, requests prepared before the clock):

``serve_hit``          ``featcache serve``: ``POST /v1/features`` of fresh ids (all in Redis,
                       no L1: every request reads Redis)
``serve_hit_l1``       ``featcache serve`` with an L1 (``l1.policy: lru``) holding every row,
                       filled by one pass over the ids before the clock: every value
                       ``HIT_L1``, no Redis read; the server's own cost per request
``http_floor``         the same framework and server answering the same request with a body
                       prepared before the run, the size of ``serve_hit``'s answer for that
                       batch: what any Python HTTP service costs before it does any work
``http_floor_granian`` that floor app on granian instead of uvicorn, to compare the servers

at concurrency 1, 16 and 64 for batches of 1 and 100: p50/p99 latency per request and requests
per second. Rounds alternate the targets, so both see the same machine. The table and JSON
have the shape of ``bench read``'s, plus ``rps`` per HTTP case.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio

from bench import dataset
from bench.common import (
    Report,
    Schedule,
    Summary,
    Target,
    add_common_arguments,
    aligned,
    finish,
    format_table,
    frozen_heap,
    log,
    ratios_to,
    run_context,
    williams_orders,
)
from bench.read import Env, prepared_env
from featcache import AsyncFeatureCache, Status
from featcache.embedded import free_port

DESCRIPTION = ("asyncio client and HTTP server: AsyncFeatureCache vs FeatureCache vs an "
               "asyncio MGET; featcache serve vs the same framework answering a fixed body")

ASYNC_BATCHES = (1, 100, 1000)
HTTP_BATCHES = (1, 100)
CONCURRENCY = (1, 16, 64)
ASYNC_CASES = ("floor_mget_async", "async_hit", "featcache_hit", "async_miss",
               "featcache_miss")
HTTP_CASES = ("http_floor", "serve_hit", "serve_hit_l1", "http_floor_granian")
SERVE_CASES = ("serve_hit", "serve_hit_l1")
#: async p50 at most this many times the sync client's / its own floor's
ASYNC_VS_SYNC = 1.2
ASYNC_VS_FLOOR = 1.5
#: serve_hit p50 at most this many times http_floor's, at batch 100
SERVE_VS_FLOOR = 2.0
POOL = 256  # distinct requests prepared per (batch) for the HTTP load


@dataclass(frozen=True)
class Mode:
    users: int
    schedules: dict[int, Schedule]
    http_rounds: int
    http_round_s: float


QUICK = Mode(
    users=20_000,
    schedules={1: Schedule(rounds=1_500, warmup_rounds=100, budget_s=3.0),
               100: Schedule(rounds=600, warmup_rounds=30, budget_s=3.0),
               1000: Schedule(rounds=150, warmup_rounds=5, budget_s=5.0)},
    http_rounds=2,
    http_round_s=1.0,
)
FULL = Mode(
    users=20_000,
    schedules={1: Schedule(rounds=8_000, warmup_rounds=300, budget_s=20.0),
               100: Schedule(rounds=3_000, warmup_rounds=50, budget_s=25.0),
               1000: Schedule(rounds=600, warmup_rounds=10, budget_s=40.0)},
    http_rounds=4,
    http_round_s=3.0,
)


@dataclass(frozen=True)
class HttpSummary:
    """One HTTP case at one batch and concurrency."""

    case: str
    batch: int
    concurrency: int
    p50_us: float
    p99_us: float
    n: int
    rps: float


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "a shorter run (under 90 s)")
    parser.add_argument("--no-http", action="store_true", help="only the in-process cases")


def run(args: argparse.Namespace) -> int:
    mode = QUICK if args.quick else FULL
    started = time.perf_counter()
    with run_context(args.redis_url) as ctx, prepared_env(ctx.target, mode.users,
                                                          args.seed) as env:
        import uvloop  # noqa: PLC0415 - what a serving process runs

        summaries = uvloop.run(_async_cases(env, mode))
        http: list[HttpSummary] = []
        if not args.no_http:
            http = _http_cases(env, mode)
        setup = ctx.setup(args.seed)
    ratios = ratios_to("floor_mget_async", summaries) + ratios_to("featcache_hit", summaries)
    targets = _targets(summaries, http)
    report = Report(cases=summaries, ratios=ratios, server=ctx.server, quick=args.quick,
                    targets=targets,
                    extra={"http": [asdict(h) for h in http], "setup": {
                        **setup, "users": mode.users, "loop": "uvloop",
                        "http_server": "uvicorn (uvloop, httptools), Starlette",
                        "features": list(dataset.FEATURE_NAMES)}})
    print(ctx.header("featcache asyncio client and HTTP server", args.quick, setup))
    print()
    print(format_table(summaries, ratios_to("floor_mget_async", summaries),
                       "floor_mget_async"))
    if http:
        print()
        print(_http_table(http))
    return finish(report, args.json, started)


# ----------------------------------------------------------------------------- in process


async def _async_cases(env: Env, mode: Mode) -> list[Summary]:
    names = list(dataset.FEATURE_NAMES)
    acache = AsyncFeatureCache(env.cache.config)
    client = redis.asyncio.Redis.from_url(env.cache.config.redis.url)
    floor_head = env.floor_head
    sync_get = env.cache.get_features

    async def floor_mget_async(ids: list[int]) -> Any:
        return await client.mget([f"{floor_head}{i}" for i in ids])

    async def async_hit(ids: list[int]) -> Any:
        return await acache.get_features(ids, names)

    async def featcache_hit(ids: list[int]) -> Any:
        return sync_get(ids, names)

    async def unlink(ids: list[int]) -> None:
        await client.unlink(*env.row_keys(ids))

    cases: dict[str, Callable[[list[int]], Awaitable[Any]]] = {
        "floor_mget_async": floor_mget_async, "async_hit": async_hit,
        "featcache_hit": featcache_hit, "async_miss": async_hit,
        "featcache_miss": featcache_hit}
    prepare = {"async_miss": unlink, "featcache_miss": unlink}
    order = [cases[name] for name in ASYNC_CASES]
    before = [prepare.get(name) for name in ASYNC_CASES]
    rng = random.Random(7)
    out: list[Summary] = []
    try:
        for batch in ASYNC_BATCHES:
            # every row a hit: checked on a sample, untimed
            check = await acache.get_features(rng.sample(env.ids, batch), names)
            if set(check.status_counts()) != {Status.HIT_REDIS}:
                raise RuntimeError(f"async_hit at batch {batch} did not hit: "
                                   f"{check.status_counts()}")
            schedule = mode.schedules[batch]
            samples = await _interleaved(order, before,
                                         functools.partial(rng.sample, env.ids, batch),
                                         schedule)
            out.extend(Summary.of(name, batch, samples[i])
                       for i, name in enumerate(ASYNC_CASES))
            log(f"async batch {batch}: {len(samples[0])} rounds")
    finally:
        await acache.aclose()
        await client.aclose()
    return out


async def _interleaved(cases: Sequence[Callable[[list[int]], Awaitable[Any]]],
                       before: Sequence[Callable[[list[int]], Awaitable[None]] | None],
                       make_input: Callable[[], list[int]], schedule: Schedule
                       ) -> list[list[int]]:
    """``bench.common.run_interleaved``, awaiting each call on the running loop (``before``:
    each case's untimed preparation of its input)."""
    orders = williams_orders(len(cases))
    for r in range(schedule.warmup_rounds):
        for i in orders[r % len(orders)]:
            ids = make_input()
            if (prepare := before[i]) is not None:
                await prepare(ids)
            await cases[i](ids)
    samples: list[list[int]] = [[] for _ in cases]
    with frozen_heap():
        deadline = time.perf_counter() + schedule.budget_s
        for r in range(schedule.rounds):
            for i in orders[r % len(orders)]:
                ids = make_input()
                if (prepare := before[i]) is not None:
                    await prepare(ids)
                start = time.perf_counter_ns()
                result = await cases[i](ids)
                samples[i].append(time.perf_counter_ns() - start)
                del result
            if r + 1 >= schedule.min_rounds and time.perf_counter() > deadline:
                break
    return samples


# ----------------------------------------------------------------------------- over HTTP


_FLOOR_APP = '''
import json, os
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

with open(os.environ["FLOOR_BODIES"]) as f:
    BODIES = {int(k): v.encode() for k, v in json.load(f).items()}

async def answer(request):
    await request.body()
    return Response(BODIES[int(request.path_params["batch"])], media_type="application/json")

app = Starlette(routes=[Route("/floor/{batch}", answer, methods=["POST"])])
'''


@dataclass
class Proc:
    name: str
    port: int
    proc: subprocess.Popen[bytes]


@contextlib.contextmanager
def _servers(env: Env, tmp: Path, bodies: dict[int, str]) -> Iterator[list[Proc]]:
    config = tmp / "featcache.yaml"
    config.write_text(_config_yaml(env))
    config_l1 = tmp / "featcache-l1.yaml"
    # an L1 of every user, whose entries outlive the run (the stream keeps them coherent)
    config_l1.write_text(_config_yaml(env) + f"l1: {{policy: lru, max_entries: "
                                              f"{2 * len(env.ids)}, max_ttl: 1h}}\n")
    (tmp / "floor_app.py").write_text(_FLOOR_APP)
    (tmp / "bodies.json").write_text(json.dumps(bodies))
    child_env = {**os.environ, "FLOOR_BODIES": str(tmp / "bodies.json"),
                 "PYTHONPATH": f"{tmp}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    child_env.pop("FEATCACHE_SERVE_TOKEN", None)
    commands = {
        "serve_hit": [sys.executable, "-m", "featcache.jobs.cli", "--log-level", "warning",
                      "serve", "--config", str(config), "--port", "{port}"],
        "serve_hit_l1": [sys.executable, "-m", "featcache.jobs.cli", "--log-level", "warning",
                         "serve", "--config", str(config_l1), "--port", "{port}"],
        "http_floor": [sys.executable, "-m", "uvicorn", "floor_app:app", "--port", "{port}",
                       "--loop", "uvloop", "--http", "httptools", "--no-access-log",
                       "--log-level", "warning", "--no-server-header"],
    }
    granian = shutil.which("granian") or str(Path(sys.executable).with_name("granian"))
    if Path(granian).exists():
        commands["http_floor_granian"] = [
            granian, "--interface", "asgi", "--port", "{port}", "--workers", "1",
            "--loop", "uvloop", "--no-ws", "--log-level", "warning", "floor_app:app"]
    procs: list[Proc] = []
    try:
        for name, command in commands.items():
            port = free_port()
            argv = [part.replace("{port}", str(port)) for part in command]
            procs.append(Proc(name, port, subprocess.Popen(
                argv, env=child_env, cwd=tmp, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)))
        for p in procs:
            _wait_up(p)
        yield procs
    finally:
        for p in procs:
            p.proc.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.proc.wait(30)
            except subprocess.TimeoutExpired:
                p.proc.kill()


def _wait_up(p: Proc) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if p.proc.poll() is not None:
            raise RuntimeError(f"{p.name} exited {p.proc.returncode}")
        with contextlib.suppress(OSError):
            import socket  # noqa: PLC0415

            with socket.create_connection(("127.0.0.1", p.port), timeout=1):
                return
        time.sleep(0.1)
    raise RuntimeError(f"{p.name} did not start")


def _config_yaml(env: Env) -> str:
    config = env.cache.config
    view = dataset.view()
    features = "\n".join(f"      {f.name}: {{type: {f.type.value}, max_age: 1h}}"
                         for f in view.features)
    return (
        f"redis: {{url: '{config.redis.url}', key_prefix: '{config.redis.key_prefix}'}}\n"
        f"offline_store: {{url: '{config.offline_store.url}'}}\n"
        f"serve: {{max_ids: 10000}}\n"
        f"views:\n  {view.name}:\n    table: {view.table}\n"
        f"    entity: {{column: {view.entity_column}, type: int}}\n"
        f"    event_timestamp: {view.event_timestamp_column}\n"
        f"    features:\n{features}\n"
    )


def _request_bytes(path: str, port: int, body: bytes) -> bytes:
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def _read_response(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response with a Content-Length; its status code."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length:
        await reader.readexactly(length)
    return status


async def _load(port: int, requests: list[bytes], concurrency: int, seconds: float
                ) -> tuple[list[int], int]:
    """``concurrency`` keep-alive connections sending ``requests`` round-robin for
    ``seconds``; the latencies (ns) of the answered requests and how many were not 200."""
    latencies: list[int] = []
    errors = 0
    stop = time.perf_counter() + seconds

    async def connection(offset: int) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = offset
        try:
            while time.perf_counter() < stop:
                request = requests[i % len(requests)]
                i += concurrency
                started = time.perf_counter_ns()
                writer.write(request)
                status = await _read_response(reader)
                latencies.append(time.perf_counter_ns() - started)
                if status != 200:
                    errors += 1
        finally:
            writer.close()

    await asyncio.gather(*(connection(k) for k in range(concurrency)))
    return latencies, errors


def _http_cases(env: Env, mode: Mode) -> list[HttpSummary]:
    rng = random.Random(11)
    bodies_in: dict[int, list[bytes]] = {
        batch: [json.dumps({"ids": rng.sample(env.ids, batch),
                            "features": list(dataset.FEATURE_NAMES)}).encode()
                for _ in range(POOL)]
        for batch in HTTP_BATCHES}
    with tempfile.TemporaryDirectory(prefix="fcbench-serve-") as tmp:
        # the floor answers with a real answer of the same batch: one asked of a first server
        probe_dir = Path(tmp) / "probe"
        probe_dir.mkdir()
        answers: dict[int, str] = {}
        with _servers(env, probe_dir, {b: "{}" for b in HTTP_BATCHES}) as procs:
            serve = next(p for p in procs if p.name == "serve_hit")
            for batch in HTTP_BATCHES:
                response = httpx.post(f"http://127.0.0.1:{serve.port}/v1/features",
                                      content=bodies_in[batch][0], timeout=30)
                if response.status_code != 200:
                    raise RuntimeError(f"serve_hit answered {response.status_code}")
                answers[batch] = response.text
        with _servers(env, Path(tmp), answers) as procs:
            _fill_l1(next(p for p in procs if p.name == "serve_hit_l1"), env.ids,
                     bodies_in[HTTP_BATCHES[-1]][0])
            return _measure_http(procs, bodies_in, mode)


def _fill_l1(server: Proc, ids: Sequence[int], probe: bytes) -> None:
    """Every id asked once (untimed), then a request of the run checked all ``HIT_L1``."""
    names = list(dataset.FEATURE_NAMES)
    with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=60) as http:
        for start in range(0, len(ids), 1000):
            http.post("/v1/features", json={"ids": list(ids[start : start + 1000]),
                                            "features": names}).raise_for_status()
        answer = http.post("/v1/features", content=probe)
        answer.raise_for_status()
        statuses = {s for view in answer.json()["views"].values() for s in view["statuses"]}
        if statuses != {"HIT_L1"}:
            raise RuntimeError(f"serve_hit_l1 did not answer from its L1: {statuses}")


def _measure_http(procs: list[Proc], bodies_in: dict[int, list[bytes]], mode: Mode
                  ) -> list[HttpSummary]:
    import uvloop  # noqa: PLC0415

    out: list[HttpSummary] = []
    for batch in HTTP_BATCHES:
        requests = {
            p.name: [_request_bytes("/v1/features" if p.name in SERVE_CASES
                                    else f"/floor/{batch}", p.port, body)
                     for body in bodies_in[batch]]
            for p in procs}
        for concurrency in CONCURRENCY:
            samples: dict[str, list[int]] = {p.name: [] for p in procs}
            seconds: dict[str, float] = {p.name: 0.0 for p in procs}
            for r in range(mode.http_rounds):
                order = procs if r % 2 == 0 else procs[::-1]
                for p in order:
                    # warm the connections' path, untimed, then the measured round
                    uvloop.run(_load(p.port, requests[p.name], concurrency, 0.2))
                    latencies, errors = uvloop.run(
                        _load(p.port, requests[p.name], concurrency, mode.http_round_s))
                    if errors:
                        raise RuntimeError(f"{p.name}: {errors} answers were not 200")
                    samples[p.name].extend(latencies)
                    seconds[p.name] += mode.http_round_s
            for p in procs:
                s = Summary.of(p.name, batch, samples[p.name])
                out.append(HttpSummary(p.name, batch, concurrency, s.p50_us, s.p99_us, s.n,
                                       round(s.n / seconds[p.name], 1)))
            log(f"http batch {batch} concurrency {concurrency}: " + ", ".join(
                f"{h.case} {h.rps:,.0f} rps p50 {h.p50_us:,.0f} us" for h in out[-len(procs):]))
    return out


def _http_table(rows: Sequence[HttpSummary]) -> str:
    floor = {(h.batch, h.concurrency): h for h in rows if h.case == "http_floor"}
    header = ("case", "batch", "conc", "rps", "p50_us", "p99_us", "n", "p50 vs http_floor")
    table = [header]
    for h in rows:
        f = floor.get((h.batch, h.concurrency))
        table.append((h.case, str(h.batch), str(h.concurrency), f"{h.rps:,.0f}",
                      f"{h.p50_us:,.1f}", f"{h.p99_us:,.1f}", str(h.n),
                      f"{h.p50_us / f.p50_us:.2f}x" if f else "-"))
    return aligned(table)


def _targets(summaries: Sequence[Summary], http: Sequence[HttpSummary]) -> list[Target]:
    by = {(s.case, s.batch): s for s in summaries}
    out = []
    for batch in ASYNC_BATCHES:
        a, s, f = (by[("async_hit", batch)], by[("featcache_hit", batch)],
                   by[("floor_mget_async", batch)])
        out.append(Target(f"async_hit p50 <= {ASYNC_VS_SYNC}x featcache_hit, batch {batch}",
                          a.p50_us <= ASYNC_VS_SYNC * s.p50_us,
                          f"{a.p50_us:.1f} vs {s.p50_us:.1f} us ({a.p50_us / s.p50_us:.2f}x)"))
        out.append(Target(f"async_hit p50 <= {ASYNC_VS_FLOOR}x floor_mget_async, batch {batch}",
                          a.p50_us <= ASYNC_VS_FLOOR * f.p50_us,
                          f"{a.p50_us:.1f} vs {f.p50_us:.1f} us ({a.p50_us / f.p50_us:.2f}x)"))
    floor = {(h.batch, h.concurrency): h for h in http if h.case == "http_floor"}
    for h in http:
        if h.case not in SERVE_CASES or h.batch != 100:
            continue
        base = floor[(h.batch, h.concurrency)]
        out.append(Target(
            f"{h.case} p50 <= {SERVE_VS_FLOOR}x http_floor, batch 100, concurrency "
            f"{h.concurrency}", h.p50_us <= SERVE_VS_FLOOR * base.p50_us,
            f"{h.p50_us:.0f} vs {base.p50_us:.0f} us ({h.p50_us / base.p50_us:.2f}x); "
            f"{h.rps:,.0f} vs {base.rps:,.0f} rps"))
    return out
