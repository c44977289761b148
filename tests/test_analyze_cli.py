"""``featcache analyze`` end to end: a CSV and a Parquet trace in, the printed sizes, the JSON
(its shape) and the PNG (read back: its size in pixels, not blank) out; bad input gets the exit
status of its kind (docs/errors.md). Runs ``cli.main`` in this process, and the installed
console script once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from clienv import featcache, write_config
from featcache.jobs import cli

EX_USAGE, EX_DATAERR, EX_TEMPFAIL, EX_CONFIG = 2, 65, 75, 78


def zipf_rows(accesses: int, ids: int, seed: int) -> dict[str, list[Any]]:
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(1.0 / np.arange(1, ids + 1))
    ranks = np.searchsorted(cdf / cdf[-1], rng.random(accesses), side="right")
    entity = rng.permutation(ids)[np.minimum(ranks, ids - 1)]
    return {
        "view": ["user"] * accesses,
        "entity_id": [int(i) for i in entity],
        "ts": [i * 0.01 for i in range(accesses)],  # 100 reads a second
    }


@pytest.fixture
def csv_trace(tmp_path: Path) -> Path:
    rows = zipf_rows(20_000, 2_000, 1)
    path = tmp_path / "trace.csv"
    lines = ["view,entity_id,ts"] + [
        f"{v},{e},{t:.2f}" for v, e, t in zip(rows["view"], rows["entity_id"], rows["ts"],
                                               strict=True)]
    lines += ["other,1,0.5", "other,2,0.7"]  # another view's reads: not analysed
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def parquet_trace(tmp_path: Path) -> Path:
    path = tmp_path / "trace.parquet"
    rows = zipf_rows(20_000, 2_000, 2)
    rows["entity_id"] = [f"u{i}" for i in rows["entity_id"]]
    pq.write_table(pa.table(rows), path)
    return path


def check_json(path: Path, view: str, accesses: int, policies: list[str]) -> dict[str, Any]:
    doc = json.loads(path.read_text())
    assert {"view", "accesses", "sampling_rate", "curves", "sizes_for"} <= set(doc)
    assert (doc["view"], doc["accesses"], doc["sampling_rate"]) == (view, accesses, 1.0)
    assert [c["policy"] for c in doc["curves"]] == ["lru", *policies]
    for curve in doc["curves"]:
        assert set(curve) >= {"policy", "exact", "points"} and curve["exact"] is True
        sizes = [p["size"] for p in curve["points"]]
        assert sizes == sorted(set(sizes)) and all(isinstance(s, int) for s in sizes)
        assert all(0.0 <= p["hit_rate"] <= 1.0 for p in curve["points"])
        assert set(curve["points"][0]) == {"size", "hit_rate"}
    lru = [p["hit_rate"] for p in doc["curves"][0]["points"]]
    assert lru == sorted(lru) and lru[-1] > 0.5
    assert set(doc["sizes_for"]) == {"0.9", "0.95", "0.99"}
    assert all(s is None or isinstance(s, int) for s in doc["sizes_for"].values())
    return dict(doc)


def check_png(path: Path) -> None:
    from matplotlib import image  # noqa: PLC0415 - as the command does: only when needed

    pixels = image.imread(path)
    assert pixels.shape[:2] == (750, 1200), pixels.shape
    colours = np.unique(pixels.reshape(-1, pixels.shape[2]), axis=0)
    assert len(colours) > 10, len(colours)  # lines, text and a legend, not a blank page


def test_csv_trace_end_to_end(csv_trace: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    out, report = tmp_path / "curve.png", tmp_path / "curve.json"
    status = cli.main(["analyze", "--trace", str(csv_trace), "--view", "user",
                       "--max-age", "30s", "--l1-size", "100", "--maxmemory", "64kb",
                       "--bytes-per-row", "188", "--out", str(out), "--json", str(report)])
    printed = capsys.readouterr()
    assert status == 0, printed.err
    doc = check_json(report, "user", 20_000, ["lru", "lfu", "ttl", "tinylfu"])
    assert doc["freshness_ceiling"] is not None and 0 < doc["freshness_ceiling"] < 1
    assert (doc["l1_size"], doc["maxmemory_rows"], doc["bytes_per_row"]) == (100, 348, 188)
    # the policies are simulated at the marked sizes too
    assert all({100, 348} <= {p["size"] for p in c["points"]} for c in doc["curves"][1:])
    assert "90% hits: " in printed.out and "B/row)" in printed.out
    assert "freshness ceiling (max_age 30 s)" in printed.out
    assert "L1 size: 100 entries" in printed.out and "tinylfu " in printed.out
    assert f"wrote {out}" in printed.out and f"wrote {report}" in printed.out
    check_png(out)


def test_parquet_trace_end_to_end(parquet_trace: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    out, report = tmp_path / "p.png", tmp_path / "p.json"
    status = cli.main(["analyze", "--trace", str(parquet_trace), "--view", "user",
                       "--policies", "lru,tinylfu", "--out", str(out), "--json", str(report)])
    assert status == 0, capsys.readouterr().err
    doc = check_json(report, "user", 20_000, ["lru", "tinylfu"])
    assert doc["freshness_ceiling"] is None and doc["maxmemory_rows"] is None
    # the LRU simulated through L1Cache lands on the exact curve at every size it shares
    exact = {p["size"]: p["hit_rate"] for p in doc["curves"][0]["points"]}
    simulated = {p["size"]: p["hit_rate"] for p in doc["curves"][1]["points"]}
    shared = exact.keys() & simulated.keys()
    assert shared and all(exact[s] == simulated[s] for s in shared)
    check_png(out)


def test_a_sampled_trace_gives_shards_curves(csv_trace: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "s.json"
    status = cli.main(["analyze", "--trace", str(csv_trace), "--view", "user",
                       "--sampling-rate", "0.5", "--policies", "lru", "--json", str(report)])
    err = capsys.readouterr().err
    assert status == 0, err
    assert "warning: a sampled trace without --full-accesses" in err
    doc = json.loads(report.read_text())
    assert doc["sampling_rate"] == 0.5
    lru, simulated = doc["curves"]
    assert (lru["method"], lru["exact"], simulated["exact"]) == ("SHARDS", False, False)
    assert lru["points"][0]["size"] == 2  # a 1/2 sample resolves sizes from 2 entries
    # with the whole trace's length: SHARDS-adj, and no warning
    status = cli.main(["analyze", "--trace", str(csv_trace), "--view", "user",
                       "--sampling-rate", "0.5", "--full-accesses", "20000", "--policies",
                       "lru", "--json", str(report)])
    err = capsys.readouterr().err
    assert status == 0, err
    assert "warning" not in err
    assert json.loads(report.read_text())["curves"][0]["method"] == "SHARDS-adj"


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["--trace", "{tmp}/missing.csv"], EX_DATAERR, "missing.csv: no such file"),
        (["--trace", "{tmp}/bad.csv"], EX_DATAERR, "no column 'entity_id'"),
        (["--trace", "{csv}", "--view", "nobody"], EX_DATAERR, "no accesses of view 'nobody'"),
        (["--trace", "{tmp}/no_ts.csv", "--max-age", "10m"], EX_DATAERR, "needs the time"),
        (["--config", "{tmp}/featcache.yaml", "--view", "nope"], EX_CONFIG,
         "unknown feature view 'nope'"),
        (["--config", "{tmp}/featcache.yaml", "--view", "cv"], EX_TEMPFAIL,
         "redis://127.0.0.1:1/0"),
        (["--config", "{tmp}/missing.yaml"], EX_CONFIG, "missing.yaml"),
    ],
)
def test_bad_input_exits_with_its_status(
    args: list[str], status: int, message: str, csv_trace: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "bad.csv").write_text("view,id\nuser,1\n")
    (tmp_path / "no_ts.csv").write_text("view,entity_id\nuser,1\nuser,1\n")
    write_config(tmp_path / "featcache.yaml", "redis://127.0.0.1:1/0", "fc",
                 f"sqlite:///{tmp_path}/db.sqlite")
    argv = [a.format(tmp=tmp_path, csv=csv_trace) for a in args]
    if "--view" not in argv:
        argv += ["--view", "user"]
    assert cli.main(["analyze", *argv]) == status
    err = capsys.readouterr().err
    assert err.startswith("featcache: error: ") and err.count("\n") == 1, err
    assert message in err, err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--maxmemory", "1gb"], "--maxmemory needs --bytes-per-row"),
        (["--maxmemory", "lots", "--bytes-per-row", "100"], "argument --maxmemory"),
        (["--policies", "lru,arc"], "argument --policies"),
        (["--sampling-rate", "0"], "argument --sampling-rate"),
        (["--max-age", "soon"], "argument --max-age"),
        (["--l1-size", "0"], "argument --l1-size"),
    ],
)
def test_a_bad_command_line_exits_2(args: list[str], message: str, csv_trace: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    status = cli.main(["analyze", "--trace", str(csv_trace), "--view", "user", *args])
    assert status == EX_USAGE
    assert message in capsys.readouterr().err


def test_the_console_script_runs_analyze(tmp_path: Path) -> None:
    done = featcache("analyze", "--trace", str(tmp_path / "none.csv"), "--view", "user")
    assert (done.returncode, done.stdout) == (EX_DATAERR, ""), done.stderr
    assert done.stderr == f"featcache: error: trace file {tmp_path / 'none.csv'}: no such file\n"
    listed = featcache("--help").stdout
    assert "analyze" in listed
