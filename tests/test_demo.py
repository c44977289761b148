"""``featcache demo`` and the command line around it, run for real.

The demo is the first thing a new user runs, often on a laptop and sometimes against a shared
Redis, so what matters most is that it works with nothing but the package installed, that it
reports what it promises, and that it leaves nothing behind: no server, no temporary files, no
keys but its own touched, however it ends.
"""

from __future__ import annotations

import importlib.metadata
import io
import os
import pty
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
import redis
import sqlalchemy as sa
from featcache.jobs.cli import main
from servers import SqlTarget
from sqlalchemy.engine import make_url

from featcache import __version__
from featcache.demo import DEFAULT_CURVE, DemoOptions
from featcache.demo.run import run_demo
from featcache.embedded_cluster import EmbeddedCluster

DEMO_TIMEOUT_S = 120
WIDTH = 80
#: the path may be on a line of its own, when the sentence and the path exceed 80 columns
CURVE_LINE = r"^hit rate against cache size of this run:\s+(\S+)$"


def run_cli(
    *args: str, timeout: float = DEMO_TIMEOUT_S, env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """``python -m featcache.jobs.cli ...`` in a child process, as a user would run it (in
    ``cwd``: the demo writes its picture in the current directory)."""
    return subprocess.run(
        [sys.executable, "-m", "featcache.jobs.cli", *args],
        capture_output=True, text=True, timeout=timeout, check=False,
        env=None if env is None else {**os.environ, **env}, cwd=cwd,
    )


def field(output: str, pattern: str) -> str:
    match = re.search(pattern, output, re.MULTILINE)
    assert match is not None, f"{pattern!r} not found in the output:\n{output}"
    return match.group(1)


def server_gone(pid: int) -> bool:
    """The demo's valkey-server no longer runs (a zombie or a recycled pid counts as gone)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE or "valkey" not in proc.name():
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def port_closed(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) != 0


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# ------------------------------------------------------------------------------- the demo


@pytest.fixture(scope="module")
def quick_demo(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """One ``featcache demo --quick`` run, its stdout a pipe, in a directory of its own (where
    its picture goes), with ``COLUMNS`` at 80 as on a narrow terminal; shared by the tests
    of what it prints and draws."""
    cwd = tmp_path_factory.mktemp("demo")
    # Production settings in the environment must not steer the demo anywhere.
    elsewhere = {
        "FEATCACHE_REDIS_URL": "redis://nowhere.invalid:6379/0",
        "FEATCACHE_OFFLINE_URL": "postgresql+psycopg://nowhere.invalid/features",
        "FEATCACHE_KEY_PREFIX": "production",
        "COLUMNS": str(WIDTH),
    }
    return run_cli("demo", "--quick", env=elsewhere, cwd=cwd), cwd


@pytest.mark.slow
def test_quick_demo_reports_and_leaves_nothing_running(
    quick_demo: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    proc, _ = quick_demo
    out = proc.stdout
    assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{proc.stderr}"
    assert proc.stderr == ""

    # one row per phase, each with its shares by status, then the summary: five phases of
    # load alone, two with the warmer beside it
    rows = re.findall(r"^\s+(\d)/7( w)?\s+[\d,]+\s+([\d.]+)%\s+([\d.]+)%\s+([\d.]+)%\s+"
                      r"[\d.]+\s+[\d.]+\s+(\d+)%", out, re.M)
    assert [(r[0], r[1]) for r in rows] == [
        ("1", ""), ("2", ""), ("3", ""), ("4", ""), ("5", ""), ("6", " w"), ("7", " w")], out
    for _, _, hit, filled, absent, _ in rows:
        assert abs(float(hit) + float(filled) + float(absent) - 100) < 0.5
    hit_rates = [float(r[2]) for r in rows]
    assert hit_rates[4] > hit_rates[0] > 0, "the hit rate climbs as the cache warms"
    assert 0 < float(rows[4][4]) < 50, "users without activity rows show up as ABSENT"
    # the warmer's bulk load takes the share of queries saved far above the cache's alone
    saved_before, saved_after = int(rows[4][5]), int(rows[6][5])
    assert saved_after > saved_before + 20, out
    final = float(field(out, r"^hit rate:\s+([\d.]+)% of values served by Redis"))
    assert final > 80
    assert re.search(r"^latency:\s+p50 [\d.]+ ms, p99 [\d.]+ ms", out, re.M)
    saved = float(field(out, r"^SQL queries:.*: (-?[\d.]+)% saved"))
    assert 0 < saved < 100
    assert float(field(out, r"^SQL ids:.*: ([\d.]+)% saved")) > 50

    # everything it started or created is gone
    pid = int(field(out, r"valkey-server pid (\d+)\) at"))
    port = int(field(out, r"\) at\s+redis://127\.0\.0\.1:(\d+)/"))  # folded at 80
    assert f"stopped valkey-server pid {pid}" in out
    assert server_gone(pid), f"valkey-server {pid} still runs after the demo exited"
    assert port_closed(port)
    db_path = Path(field(out, r"^offline store:\s+sqlite:///(\S+) \(temporary\)"))
    assert not db_path.parent.exists(), f"temporary directory {db_path.parent} left behind"


@pytest.mark.slow
def test_quick_demo_load_moves_featcache_stats_and_the_warmer_reports(
    quick_demo: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    proc, _ = quick_demo
    out = proc.stdout
    assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{proc.stderr}"
    # what the serving process published, read back as `featcache stats` reads it: every call
    # the demo made is counted, per view, by the one process that served them
    made = int(field(out, r"\(the demo made ([\d,]+)\s+calls\)").replace(",", ""))
    assert made == int(field(out, r"^summary:\s+([\d,]+) calls").replace(",", "")) + 1
    assert re.search(r"^stats:\s+featcache stats, read back from Redis: 1 process published",
                     out, re.M), out
    counted = {view: int(n.replace(",", "")) for view, n in
               re.findall(r"^\s+(user_\w+): ([\d,]+) calls, [\d.]+% of values", out, re.M)}
    assert counted == {"user_profile": made, "user_activity": made}, out
    # the warmer wrote the views in bulk beside the load, through the fenced write path
    written = int(field(out, r"materialize wrote ([\d,]+) rows of 2 views").replace(",", ""))
    assert written > 0
    before, after = (int(n) for n in re.findall(
        r"calls Redis answered alone: (\d+)% in phase 5,\s+(\d+)% in phase 7", out)[0])
    assert after > before, out


def too_wide(out: str) -> list[str]:
    return [f"{len(line)}: {line}" for line in out.splitlines() if len(line) > WIDTH]


@pytest.mark.slow
def test_quick_demo_fits_in_80_columns(
    quick_demo: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    proc, _ = quick_demo
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    # the table, the legend, the summary and the explanation of values and calls
    assert re.search(r"^\s+7/7 w\s", proc.stdout, re.M), proc.stdout
    assert re.search(r"^values, calls:\s+a call skips SQL only if every row it reads hits",
                     proc.stdout, re.M), proc.stdout
    assert too_wide(proc.stdout) == [], "\n".join(too_wide(proc.stdout))


@pytest.mark.slow
def test_quick_demo_draws_its_hit_rate_curve(
    quick_demo: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    proc, cwd = quick_demo
    out = proc.stdout
    assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{proc.stderr}"
    printed = cwd / field(out, CURVE_LINE)
    assert printed.resolve() == (cwd / DEFAULT_CURVE).resolve(), out
    assert out.rstrip().endswith(field(out, CURVE_LINE)), "the path is the last thing printed"
    assert "temporary directory instead" not in out
    assert printed.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    check_curve_picture(printed)
    # The picture is of the run's own reads: every call's distinct ids, seven phases of 800
    # calls of 32 drawn ids.
    reads = int(field(out, r"^curve:\s+user_profile: ([\d,]+) reads").replace(",", ""))
    distinct = int(field(out, r"reads of ([\d,]+) distinct ids").replace(",", ""))
    calls = int(field(out, r"^summary:\s+([\d,]+) calls").replace(",", ""))
    assert calls == 5600
    assert 0 < distinct < reads <= calls * 32
    best = float(field(out, r"would serve\s+([\d.]+)%"))
    assert best == pytest.approx(100 * (1 - distinct / reads), abs=0.05)


def check_curve_picture(path: Path) -> None:
    """A picture of reasonable size with the black LRU curve and the red tinylfu one."""
    import matplotlib.image  # noqa: PLC0415 - heavy, for these tests alone

    pixels = np.asarray(matplotlib.image.imread(path))
    height, width = pixels.shape[:2]
    assert 400 <= width <= 4000 and 300 <= height <= 4000, pixels.shape
    rgb = pixels[..., :3]
    white = (rgb > 0.95).all(axis=-1)
    assert white.mean() < 0.99, "an all-white picture"
    assert ((rgb < 0.1).all(axis=-1)).sum() > 500, "no black LRU curve or text"
    tab_red = np.array([0.839, 0.153, 0.157])
    assert (np.abs(rgb - tab_red).max(axis=-1) < 0.1).sum() > 100, "no tinylfu curve"


def test_demo_draws_in_a_temporary_directory_if_the_path_cannot_be_written(
    tmp_path: Path,
) -> None:
    wanted = tmp_path / "no such directory" / "curve.png"
    out = io.StringIO()
    status = run_demo(DemoOptions(users=500, calls=50, curve_path=str(wanted)), out)
    text = out.getvalue()
    assert status == 0, text
    assert not wanted.parent.exists()
    assert f"cannot write {wanted} (No such file or directory): written to a temporary " \
           "directory instead" in " ".join(text.split()), text
    printed = Path(field(text, CURVE_LINE))
    try:
        assert printed.is_absolute() and printed.name == DEFAULT_CURVE, text
        assert printed.parent.name.startswith("featcache-demo-"), text
        check_curve_picture(printed)
    finally:
        shutil.rmtree(printed.parent, ignore_errors=True)


def read_terminal(args: list[str], env: dict[str, str], cwd: Path) -> Iterator[bytes]:
    """What a child writes to its terminal (a pseudo-terminal), as it comes."""
    main_fd, child_fd = pty.openpty()
    with (cwd / "stderr.txt").open("wb") as err:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=child_fd, stderr=err,
                                env={**os.environ, **env}, cwd=cwd)
    os.close(child_fd)
    try:
        while True:
            try:
                chunk = os.read(main_fd, 65536)
            except OSError:  # EIO: the child is gone and the terminal closed
                break
            if not chunk:
                break
            yield chunk
        assert proc.wait(timeout=DEMO_TIMEOUT_S) == 0, (cwd / "stderr.txt").read_text()
    finally:
        os.close(main_fd)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_demo_on_a_wide_terminal_fits_in_80_columns(tmp_path: Path) -> None:
    # the live table on a terminal is drawn by rich, to the terminal's width if nothing stops it
    raw = b"".join(read_terminal(
        [sys.executable, "-m", "featcache.jobs.cli", "demo", "--users", "2000",
         "--calls", "300", "--warm-phases", "0"],
        {"COLUMNS": "200", "LINES": "50", "TERM": "xterm-256color"}, tmp_path,
    )).decode()
    # colours out; a cursor move or a carriage return starts what is written anew
    text = re.sub(r"\x1b\[[0-9;]*m", "", raw)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\r", "\n", text)
    assert "HIT_REDIS" in text and "5/5" in text and "values, calls:" in text, text
    # a phase row starts its line with "K/N"; a temporary path may hold "6/" anywhere
    phases = {m.group(1) for m in re.finditer(r"^\s*(\d+)/\d+\s", text, re.MULTILINE)}
    assert phases == {"1", "2", "3", "4", "5"}, phases
    assert "warmer:" not in text, "--warm-phases 0: no warmer"
    assert re.search(r"^─{60,}", text, re.M), "the table's rule: rich drew it"
    assert too_wide(text) == [], "\n".join(too_wide(text))
    assert (tmp_path / DEFAULT_CURVE).is_file()


@pytest.mark.slow
def test_quick_cluster_demo_reports_and_leaves_nothing_running(tmp_path: Path) -> None:
    proc = run_cli("demo", "--cluster", "--quick", "--users", "3000", "--calls", "300",
                   env={"FEATCACHE_REDIS_URL": "redis://nowhere.invalid:6379/0"},
                   cwd=tmp_path)
    out = proc.stdout
    assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{proc.stderr}"
    assert proc.stderr == ""

    assert re.search(r"^redis:\s+private Valkey [\d.]+ cluster of 3 primaries and no\s+"
                     r"replicas, at\s+redis://127\.0\.0\.1:\d+$", out, re.M), out
    nodes = re.findall(r"pid (\d+) at 127\.0\.0\.1:(\d+)", out)  # the lines under redis:
    assert len(nodes) == 3, out
    # Hits prove cluster mode: a standalone client would be refused (MOVED) the keys of the
    # slots of two nodes out of three.
    rows = re.findall(r"^\s+(\d)/7(?: w)?\s+[\d,]+\s+([\d.]+)%", out, re.M)
    assert [r[0] for r in rows] == ["1", "2", "3", "4", "5", "6", "7"], out
    hit_rates = [float(r[1]) for r in rows]
    assert hit_rates[-1] > hit_rates[0] > 0, "the hit rate climbs as the cache warms"
    assert float(field(out, r"^hit rate:\s+([\d.]+)% of values served by Redis")) > 50

    # every node is gone, and with it every key the demo wrote
    pids = ", ".join(pid for pid, _ in nodes)
    assert f"stopped the cluster's valkey-server pids {pids}" in out
    for pid, port in nodes:
        assert server_gone(int(pid)), f"valkey-server {pid} still runs after the demo exited"
        assert port_closed(int(port)), f"port {port} still open after the demo exited"
    db_path = Path(field(out, r"^offline store:\s+sqlite:///(\S+) \(temporary\)"))
    assert not db_path.parent.exists(), f"temporary directory {db_path.parent} left behind"


def keys_on(cluster: EmbeddedCluster, pattern: str, primaries: bool = False) -> dict[str, int]:
    """How many keys match ``pattern`` on each node (replicas included unless ``primaries``),
    by address."""
    counts: dict[str, int] = {}
    for node in cluster.primaries() if primaries else cluster.nodes:
        client = node.client()
        try:
            counts[node.address] = sum(1 for _ in client.scan_iter(match=pattern, count=1000))
        finally:
            client.close()
    return counts


@pytest.mark.slow
def test_cluster_demo_on_a_shared_cluster_deletes_its_keys_from_every_node(
    redis_cluster: EmbeddedCluster, cluster_key_prefix: str, tmp_path: Path
) -> None:
    # Another application's keys on every primary, some shaped like the demo's cluster rows.
    other = redis.RedisCluster.from_url(redis_cluster.nodes[0].url)
    try:
        for i in range(60):
            other.set(f"{cluster_key_prefix}:k{i}", b"keep")
            other.set(f"{cluster_key_prefix}:{{user_profile:{i:02d}}}:{i}", b"keep")
    finally:
        other.close()
    kept = keys_on(redis_cluster, f"{cluster_key_prefix}:*", primaries=True)
    assert len(kept) == 3 and all(kept.values()), kept

    # a node other than the first: any node leads the client to the others
    url = f"{redis_cluster.nodes[1].url}/0"
    proc = run_cli("demo", "--cluster", "--redis-url", url, "--users", "2000",
                   "--calls", "200", cwd=tmp_path)
    out = proc.stdout
    assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{proc.stderr}"
    assert re.search(rf"^redis:\s+Valkey [\d.]+ cluster of 3 primaries at\s+{re.escape(url)}$",
                     out, re.M), out
    assert "valkey-server pid" not in out, "no private server with --redis-url"
    assert float(field(out, r"^hit rate:\s+([\d.]+)%")) > 50
    prefix = field(out, r"^key prefix:\s+(fcdemo-[0-9a-f]+) ")
    deleted = int(field(out, rf"deleted ([\d,]+) keys {prefix}:\*").replace(",", ""))
    assert deleted > 1000, "a row of each of 2 views per id drawn, in every primary's slots"

    # none of its keys on any node (a replica applies its primary's UNLINKs a moment later)
    deadline = time.monotonic() + 10
    while any((left := keys_on(redis_cluster, f"{prefix}:*")).values()):
        assert time.monotonic() < deadline, f"keys of {prefix} left behind: {left}"
        time.sleep(0.1)
    assert keys_on(redis_cluster, f"{cluster_key_prefix}:*", primaries=True) == kept


def test_cluster_flag_and_the_server_must_agree(
    capsys: pytest.CaptureFixture[str], redis_url: str, redis_cluster: EmbeddedCluster
) -> None:
    assert main(["demo", "--cluster", "--quick", "--redis-url", redis_url]) == 78
    err = capsys.readouterr().err
    assert err.startswith("featcache: error: --redis-url: ") and err.count("\n") == 1, err
    assert "is not a cluster node (cluster_enabled:0): without --cluster" in err

    node = redis_cluster.nodes[0].url
    assert main(["demo", "--quick", "--redis-url", node]) == 78
    err = capsys.readouterr().err
    assert err == (f"featcache: error: --redis-url: {node} is a cluster node: add --cluster "
                   "to run the demo on its cluster\n")

    assert main(["demo", "--cluster", "--redis-url", f"{node}/1"]) == 78
    captured = capsys.readouterr()
    assert captured.err.startswith("featcache: error: --redis-url: a cluster has database 0 "
                                   "only"), captured.err
    assert captured.out == "", "nothing is started for a URL that cannot work"


def demo_url(target: SqlTarget) -> str:
    """The target's URL, with its PostgreSQL schema first on the search path.

    The demo's tables are unqualified (the example config names no schema), so on PostgreSQL
    the connection's search path is what confines them to the test's schema.
    """
    if target.schema is None:
        return target.url
    url = make_url(target.url).update_query_dict({"options": f"-csearch_path={target.schema}"})
    return url.render_as_string(hide_password=False)


@pytest.mark.slow
def test_demo_on_shared_servers_touches_only_its_own(
    redis_url: str, redis_client: redis.Redis, key_prefix: str, sql_target: SqlTarget,
    tmp_path: Path,
) -> None:
    # Keys another application owns, one of them shaped like a demo row.
    redis_client.set(f"{key_prefix}:sentinel", b"keep")
    redis_client.set(f"{key_prefix}:user_profile:1", b"keep")
    offline_url = demo_url(sql_target)
    args = ("demo", "--redis-url", redis_url, "--offline-url", offline_url,
            "--users", "3000", "--calls", "300")

    first = run_cli(*args, cwd=tmp_path)
    assert first.returncode == 0, f"stdout:\n{first.stdout}\nstderr:\n{first.stderr}"
    second = run_cli(*args, cwd=tmp_path)
    assert second.returncode == 0, f"stdout:\n{second.stdout}\nstderr:\n{second.stderr}"

    assert "built in" in first.stdout
    assert "reused in" in second.stdout, "a filled offline store is reused, not refilled"
    for run in (first, second):
        prefix = field(run.stdout, r"^key prefix:\s+(fcdemo-[0-9a-f]+) ")
        deleted = int(field(run.stdout, rf"deleted ([\d,]+) keys {prefix}:\*").replace(",", ""))
        assert deleted > 0
        assert list(redis_client.scan_iter(match=f"{prefix}:*")) == []
        assert "valkey-server pid" not in run.stdout, "no private server with --redis-url"
        assert float(field(run.stdout, r"^hit rate:\s+([\d.]+)%")) > 50
    assert redis_client.get(f"{key_prefix}:sentinel") == b"keep"
    assert redis_client.get(f"{key_prefix}:user_profile:1") == b"keep"

    engine = sa.create_engine(offline_url, poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            users = conn.execute(
                sa.text("SELECT COUNT(DISTINCT user_id) FROM featcache_demo_user_profile")
            ).scalar_one()
            history = conn.execute(sa.text(
                "SELECT COUNT(*) FROM (SELECT user_id FROM featcache_demo_user_activity "
                "GROUP BY user_id HAVING COUNT(*) > 1) AS t"
            )).scalar_one()
    finally:
        engine.dispose()
    assert users == 3000
    assert history > 0, "some users have several rows, so 'latest row' matters"


@pytest.mark.slow
@pytest.mark.parametrize(("args", "servers"), [([], 1), (["--cluster"], 3)],
                         ids=["server", "cluster"])
def test_sigterm_cleans_up(args: list[str], servers: int, tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "featcache.jobs.cli", "demo", "--quick", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        for line in proc.stdout:  # wait until the server runs and the sample is being built
            lines.append(line)
            if line.startswith("offline store:"):
                break
        header = "".join(lines)
        pids = [int(pid) for pid in re.findall(r"\bpid (\d+)", header)]
        db_path = Path(field(header, r"^offline store:\s+sqlite:///(\S+) \(temporary\)"))
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=DEMO_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, f"stdout:\n{header}{rest}\nstderr:\n{err}"
    assert "featcache: terminated" in err
    assert "Traceback" not in err
    assert len(pids) == servers, header
    for pid in pids:
        assert server_gone(pid), f"valkey-server {pid} still runs after the demo exited"
    assert not db_path.parent.exists()


# ------------------------------------------------------------------------------- the CLI


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"featcache {__version__}"


def test_version_from_python_dash_m() -> None:
    proc = run_cli("--version", timeout=60)
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"featcache {__version__}"


def test_console_script() -> None:
    """The ``featcache`` script pip installs from ``[project.scripts]``, found where the
    running interpreter's install scheme puts scripts (a venv's ``bin``, or the user scheme's
    for ``pip install --user``). The README installs the package before running the tests,
    so a missing script is a packaging error, not a reason to skip."""
    entry = [ep for ep in importlib.metadata.entry_points(group="console_scripts")
             if ep.name == "featcache"]
    assert [ep.value for ep in entry] == ["featcache.jobs.cli:main"], (
        "featcache is not installed with its console script (pip install -e .)")
    places = {Path(sys.executable).parent, Path(sysconfig.get_path("scripts")),
              Path(sysconfig.get_path("scripts", f"{os.name}_user"))}
    found = [place / "featcache" for place in places if (place / "featcache").exists()]
    assert found, f"no featcache script in {sorted(map(str, places))}"
    script = found[0]
    proc = subprocess.run(
        [str(script), "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert (proc.returncode, proc.stdout.strip()) == (0, f"featcache {__version__}")


def test_a_command_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "required: COMMAND" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--users", "-5"], "argument --users: must be at least 1, got -5"),
        (["--users", "many"], "argument --users: expected an integer, got 'many'"),
        (["--batch", "0"], "argument --batch: must be at least 1, got 0"),
        (["--zipf", "-1"], "argument --zipf: must be a finite number >= 0, got -1"),
        (["--warm-phases", "-1"], "argument --warm-phases: must be at least 0, got -1"),
    ],
)
def test_bad_demo_arguments_exit_2(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(["demo", *args]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_unreachable_redis_is_one_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    assert main(["demo", "--quick", "--redis-url", f"redis://127.0.0.1:{port}/0"]) == 75
    err = capsys.readouterr().err
    assert err.startswith(f"featcache: error: cannot reach Redis at redis://127.0.0.1:{port}/0")
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--redis-url", "http://localhost"], "featcache: error: --redis-url: expected a "),
        (["--offline-url", "nosuchdb://x"], "featcache: error: --offline-url: cannot use "),
    ],
)
def test_malformed_urls_name_the_flag(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(["demo", *args]) == 78
    captured = capsys.readouterr()
    assert captured.err.startswith(message)
    assert captured.out == "", "nothing is started for a URL that cannot work"
