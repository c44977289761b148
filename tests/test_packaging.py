"""What a wheel ships: every package of the source tree is listed in pyproject.toml (an
editable install finds any directory; a wheel holds only what is listed)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_directory_is_listed_for_the_wheel() -> None:
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setup["packages"])
    found = {".".join(init.parent.relative_to(ROOT).parts)
             for init in (ROOT / "featcache").rglob("__init__.py")}
    found |= {"featcache.jobs"} if (ROOT / "jobs" / "__init__.py").exists() else set()
    assert found <= listed, sorted(found - listed)
