"""``featcache validate``: check a configuration against the servers it names, before a
deployment meets them.

Redis: reachable with the configured credentials (a key of the cache is read, as a
``FeatureCache`` does when it starts), and, per server (each primary of a cluster), its
version, role, ``maxmemory`` and ``maxmemory-policy`` from ``INFO``. SQL: every view's table,
columns and types, a sample of rows converted as a read converts them, and an index on the
entity column (``featcache.offline.checks``).

Every check runs, whatever the others found, and the report lists them all: a short text, or
one JSON object with ``--json``. Warnings (``noeviction``, no ``maxmemory``, a column type
other than the declared one, a lookup that scans) are printed and leave the status 0. Errors
end the command with the error of the most decisive one, so the status follows the command
line's table: 78 when any error is the configuration's (wrong password, missing table or
column, a value of another type, a cluster reached as one server, a server older than Redis
7.0), else 69 when the database refused a statement, else 75 when a server could not be
reached (the one worth retrying).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any, Final, TextIO

from featcache.config import CacheConfig, load_config
from featcache.errors import (
    CacheUnavailable,
    ConfigError,
    FeatcacheError,
    OfflineStoreError,
    OfflineStoreUnavailable,
)
from featcache.keys import CLUSTER_SLOTS, KeyLayout
from featcache.offline import OfflineStore
from featcache.offline.checks import check_view
from featcache.redis_store import open_store
from featcache.redis_store.admin import (
    Node,
    primaries,
    redis_errors,
    replicas,
    server_info,
    slot_owners,
)

__all__ = ["Finding", "ValidateReport", "run_validate", "validate"]

ERROR: Final = "error"
WARNING: Final = "warning"
OK: Final = "ok"
#: the oldest server featcache runs on (``SET ... NX GET`` in the write scripts), and the
#: oldest its suite runs on (README.md, "Development")
_OLDEST: Final = (7, 0)


@dataclass(frozen=True, slots=True)
class Finding:
    """One line of the report: ``ok`` (what was found), ``warning`` or ``error`` (with the
    error that decides the exit status)."""

    level: str
    subject: str
    message: str
    error: FeatcacheError | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"level": self.level, "subject": self.subject,
                               "message": self.message}
        if isinstance(self.error, ConfigError) and self.error.path:
            out["path"] = self.error.path
        return out


@dataclass(slots=True)
class ValidateReport:
    """Everything ``validate`` found; ``redis`` and ``views`` hold the facts (servers,
    tables), ``findings`` every line of the report in order."""

    config: str
    redis: dict[str, Any] = field(default_factory=dict)
    sql: str = ""
    views: list[dict[str, Any]] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[FeatcacheError]:
        return [f.error for f in self.findings if f.level == ERROR and f.error is not None]

    @property
    def warnings(self) -> int:
        return sum(f.level == WARNING for f in self.findings)

    def as_dict(self) -> dict[str, Any]:
        return {
            "config": self.config, "ok": not self.errors, "errors": len(self.errors),
            "warnings": self.warnings, "redis": self.redis, "sql": self.sql,
            "views": self.views, "findings": [f.as_dict() for f in self.findings],
        }


def validate(config: CacheConfig, source: str = "") -> ValidateReport:
    """Run every check of ``config``; nothing raises but a bug."""
    report = ValidateReport(source or config.source)
    _check_redis(config, report)
    _check_sql(config, report)
    return report


# ----------------------------------------------------------------------------- Redis


def _check_redis(config: CacheConfig, report: ValidateReport) -> None:
    section = config.redis
    layout = KeyLayout.for_mode(section.key_prefix, section.mode)
    store = open_store(section, None, config.degradation)
    report.redis = {"mode": section.mode, "url": store.url, "key_prefix": section.key_prefix,
                    "nodes": []}
    try:
        try:
            # what FeatureCache reads when it starts: credentials, ACL rules on the cache's
            # keys, the database number, a server of another kind than redis.mode says
            store.read([layout.epoch_key(config.views[0].name)])
            nodes = primaries(store, section.mode)
            if section.mode == "sentinel":  # name the primary the Sentinels gave
                with redis_errors(store.url):
                    host, port = store.client.connection_pool.get_master_address()
                nodes = [Node(f"{host}:{port}", nodes[0].client)]
            owners = slot_owners(store) if section.mode == "cluster" else {}
        except FeatcacheError as exc:
            report.findings.append(Finding(ERROR, "redis", str(exc), exc))
            return
        if section.mode == "cluster":
            owned = sum(owners.values())
            if owned < CLUSTER_SLOTS:
                error = CacheUnavailable(f"Redis {store.url}: {CLUSTER_SLOTS - owned} of "
                                         f"{CLUSTER_SLOTS} slots have no primary: their keys "
                                         "cannot be read or written")
                report.findings.append(Finding(ERROR, "redis", str(error), error))
        for node in nodes:
            _check_node(config, node, owners.get(node.name), report)
    finally:
        store.close()


def _check_node(config: CacheConfig, node: Node, slots: int | None,
                report: ValidateReport) -> None:
    subject = f"redis {node.name}"
    try:
        info = server_info(node)
    except FeatcacheError as exc:
        report.findings.append(Finding(ERROR, subject, str(exc), exc))
        return
    server = str(info.get("server_name") or "redis")
    version = str(info.get("valkey_version") or info.get("redis_version") or "?")
    maxmemory = int(info.get("maxmemory") or 0)
    policy = str(info.get("maxmemory_policy") or "?")
    role = str(info.get("role") or "?")
    followers = replicas(info)
    facts: dict[str, Any] = {
        "address": node.name, "server": server, "version": version, "role": role,
        "maxmemory": maxmemory, "maxmemory_policy": policy,
        "used_memory": int(info.get("used_memory") or 0), "replicas": followers,
    }
    summary = (f"{server} {version}, {role}, maxmemory "
               f"{_bytes(maxmemory) if maxmemory else '0 (no limit)'}, "
               f"maxmemory-policy {policy}")
    if slots is not None:
        facts["slots"] = slots
        summary += f", {slots} slots"
    if followers:
        summary += f", replicas {', '.join(followers)}"
    report.redis["nodes"].append(facts)
    report.findings.append(Finding(OK, subject, summary))
    mode = config.redis.mode
    if mode != "cluster" and int(info.get("cluster_enabled") or 0):
        error = ConfigError(f"{node.name} is a cluster node: reach a cluster with redis.mode: "
                            "cluster", "redis.mode", config.source)
        report.findings.append(Finding(ERROR, subject, str(error), error))
    elif mode == "standalone" and role not in ("master", "primary", "?"):
        error = ConfigError(f"{node.name} is a replica (role {role}): it refuses writes "
                            "(READONLY); point redis.url at the primary, or use redis.mode: "
                            "sentinel", "redis.url", config.source)
        report.findings.append(Finding(ERROR, subject, str(error), error))
    if policy == "noeviction":
        report.findings.append(Finding(WARNING, subject, (
            "maxmemory-policy is noeviction: once maxmemory is reached every write fails "
            "(OOM): fills are lost (fill_errors), put_rows, materialize and invalidate fail; "
            "set maxmemory-policy allkeys-lfu")))
    if not maxmemory:
        report.findings.append(Finding(WARNING, subject, (
            "maxmemory is 0 (no limit): no policy ever evicts, and the server grows with the "
            "cache until the host runs out of memory; size it (rows x ~190 B plus the "
            "invalidation stream: docs/deployment.md)")))
    if _version(str(info.get("redis_version") or "")) < _OLDEST:
        error = ConfigError(f"{server} {version} is older than Redis 7.0, which featcache "
                            "needs: its write scripts use SET ... NX GET, so the first fill "
                            "into an empty key and every bulk load raise CacheConfigError; "
                            "upgrade to Redis >= 7.0 or Valkey", "redis.url", config.source)
        report.findings.append(Finding(ERROR, subject, str(error), error))


def _version(text: str) -> tuple[int, int]:
    parts = [*text.split("."), "0", "0"][:2]
    try:
        return int(parts[0]), int(parts[1])
    except ValueError:
        return _OLDEST  # not known: nothing to say


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


# ----------------------------------------------------------------------------- SQL


def _check_sql(config: CacheConfig, report: ValidateReport) -> None:
    try:
        offline = OfflineStore(config.offline_store, config.views, source=config.source)
    except FeatcacheError as exc:
        report.findings.append(Finding(ERROR, "sql", str(exc), exc))
        return
    report.sql = offline.url
    try:
        for view in config.views:
            check = check_view(offline, view)
            subject = f"view {view.name}"
            report.views.append({"view": view.name, "table": check.table,
                                 "notes": check.notes, "warnings": check.warnings,
                                 "errors": [str(e) for e in check.errors]})
            if any(isinstance(e, OfflineStoreUnavailable) for e in check.errors):
                error = check.errors[0]
                # the database, not the view: said once, and the other views not tried
                report.findings.append(Finding(ERROR, "sql", str(error), error))
                return
            report.findings.append(Finding(OK, subject, f"table {check.table}"))
            report.findings += [Finding(OK, subject, note) for note in check.notes]
            report.findings += [Finding(ERROR, subject, str(e), e) for e in check.errors]
            report.findings += [Finding(WARNING, subject, text) for text in check.warnings]
    finally:
        offline.close()


# ----------------------------------------------------------------------------- CLI


def _decisive(errors: list[FeatcacheError]) -> FeatcacheError:
    """The error whose exit status the command ends with: the configuration's first (no
    retry helps), then a statement the database refused, then an unreachable server."""
    def rank(error: FeatcacheError) -> int:
        if isinstance(error, ConfigError):
            return 0
        if isinstance(error, OfflineStoreError) and not isinstance(
                error, OfflineStoreUnavailable):
            return 1
        return 2

    return min(errors, key=rank)  # min keeps the first of equal rank


def _failed(errors: list[FeatcacheError]) -> FeatcacheError:
    """What the command raises: of the decisive error's class (which decides the exit
    status), saying how many checks failed."""
    first = _decisive(errors)
    message = (str(first) if len(errors) == 1
               else f"{len(errors)} checks failed (the report lists them): {first}")
    if isinstance(first, ConfigError):
        return ConfigError(message)
    if isinstance(first, OfflineStoreUnavailable):
        return OfflineStoreUnavailable(message)
    if isinstance(first, OfflineStoreError):
        return OfflineStoreError(message)
    if isinstance(first, CacheUnavailable):
        return CacheUnavailable(message)
    return FeatcacheError(message)


def render(report: ValidateReport) -> str:
    """The human report: the Redis findings, then the SQL ones, one line each, then the
    totals."""
    lines = [f"featcache validate {report.config}"]
    headers = {"redis": f"redis: {report.redis.get('mode', '?')} {report.redis.get('url', '')}",
               "sql": f"sql: {report.sql or '?'}"}
    shown: set[str] = set()
    for finding in report.findings:
        section = "redis" if finding.subject.startswith("redis") else "sql"
        if section not in shown:
            shown.add(section)
            lines.append(headers[section])
        where = finding.subject.removeprefix(section).strip()
        lines.append(f"  {finding.level:<8} {where + ': ' if where else ''}{finding.message}")
    errors, warnings = len(report.errors), report.warnings
    lines.append(f"{errors} error{'s' * (errors != 1)}, {warnings} warning"
                 f"{'s' * (warnings != 1)}")
    return "\n".join(lines) + "\n"


def run_validate(config_path: str, as_json: bool = False,
                 out: TextIO | None = None, *, strict: bool = False) -> ValidateReport:
    """``featcache validate``: prints the report; raises (``_failed``) when a check failed,
    and with ``strict`` a ``ConfigError`` when only warnings were found (a deployment check
    in a pipeline that must stop on a missing index or ``noeviction``)."""
    config = load_config(config_path)  # a config that does not load: its own error, as today
    report = validate(config, config_path)
    stream = out or sys.stdout
    stream.write(json.dumps(report.as_dict()) + "\n" if as_json else render(report))
    stream.flush()
    if report.errors:
        raise _failed(report.errors)
    if strict and report.warnings:
        first = next(f for f in report.findings if f.level == WARNING)
        raise ConfigError(f"{report.warnings} warning{'s' * (report.warnings != 1)} with "
                          f"--strict (the report lists them): {first.subject}: "
                          f"{first.message}")
    return report
