"""Schema migrations of the inventory database (`appliance.config.inventory`).

`MIGRATIONS[i]` is the SQL script that takes the schema from version ``i`` to
``i + 1``; the applied count lives in ``PRAGMA user_version``. A published migration
is never edited, only followed by a new one. Each one runs in its own ``BEGIN
IMMEDIATE`` transaction together with the version bump, so a crash leaves the database
at the old version or the new one, never in between (SQLite DDL is transactional).

Closed choices (roles, states, kinds) are checked in Python against the `model` enums,
not by SQL CHECK constraints: adding a job kind must not need a table rebuild. The
constraints kept in SQL are the structural ones that no release will relax; the rest of
the column rules are the checks and field tables at the end of this module, which the
inventory applies before every write, and `records()` is the matching read side (JSON
text to objects, 0/1 to bool).
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
from collections.abc import Callable, Mapping
from typing import Any

from appliance.config import replica
from appliance.config.api import Record
from appliance.config.errors import ConfigServerError, InvalidArgument
from appliance.config.model import JobState

_V1 = """
CREATE TABLE policies (
    name TEXT PRIMARY KEY,
    rpo_threshold_s REAL NOT NULL DEFAULT 900 CHECK (rpo_threshold_s > 0),
    crash_interval_s REAL NOT NULL DEFAULT 5 CHECK (crash_interval_s > 0),
    app_interval_s REAL NOT NULL DEFAULT 3600 CHECK (app_interval_s > 0),
    retention_hours REAL NOT NULL DEFAULT 24 CHECK (retention_hours > 0),
    retention_bytes INTEGER CHECK (retention_bytes >= 0),
    pre_script TEXT,
    post_script TEXT
) STRICT;
INSERT INTO policies (name) VALUES ('default');

CREATE TABLE sites (
    name TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('primary', 'secondary'))
) STRICT;

CREATE TABLE vcenters (
    name TEXT PRIMARY KEY,
    site TEXT NOT NULL REFERENCES sites (name),
    address TEXT NOT NULL,
    thumbprint TEXT
) STRICT;
CREATE INDEX vcenters_by_site ON vcenters (site);

CREATE TABLE servers (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    address TEXT NOT NULL,
    site TEXT,
    target TEXT,
    enrolled_at REAL,
    last_seen REAL,
    stats TEXT,
    capacity_bytes INTEGER CHECK (capacity_bytes >= 0),
    free_bytes INTEGER CHECK (free_bytes >= 0)
) STRICT;

CREATE TABLE groups (
    name TEXT PRIMARY KEY,
    policy TEXT REFERENCES policies (name)
) STRICT;
CREATE INDEX groups_by_policy ON groups (policy);

CREATE TABLE plans (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL
) STRICT;

CREATE TABLE machines (
    name TEXT PRIMARY KEY,
    hostname TEXT NOT NULL,
    site TEXT,
    policy TEXT NOT NULL DEFAULT 'default' REFERENCES policies (name),
    process_server TEXT REFERENCES servers (name),
    master_target TEXT REFERENCES servers (name),
    group_name TEXT REFERENCES groups (name),
    protection_enabled INTEGER NOT NULL DEFAULT 0 CHECK (protection_enabled IN (0, 1)),
    replicating INTEGER NOT NULL DEFAULT 0 CHECK (replicating IN (0, 1)),
    resync_requested INTEGER NOT NULL DEFAULT 0 CHECK (resync_requested >= 0),
    resync_done INTEGER NOT NULL DEFAULT 0 CHECK (resync_done >= 0),
    state TEXT NOT NULL,
    state_since REAL NOT NULL,
    last_seen REAL,
    newest_point_time REAL,
    newest_point_tag TEXT,
    newest_point_kind TEXT,
    newest_app_point_time REAL,
    agent TEXT,
    created_at REAL NOT NULL
) STRICT;
-- The foreign-key children are indexed so that checking a parent is not a scan, and
-- so that machine_load() is two index walks.
CREATE INDEX machines_by_policy ON machines (policy);
CREATE INDEX machines_by_process_server ON machines (process_server);
CREATE INDEX machines_by_master_target ON machines (master_target);
CREATE INDEX machines_by_group ON machines (group_name);
CREATE INDEX machines_by_state ON machines (state);

CREATE TABLE disks (
    machine TEXT NOT NULL REFERENCES machines (name) ON DELETE CASCADE,
    disk_id TEXT NOT NULL,
    path TEXT NOT NULL,
    size_bytes INTEGER NOT NULL CHECK (size_bytes > 0),
    sector_size INTEGER NOT NULL CHECK (sector_size > 0),
    initial_percent REAL NOT NULL DEFAULT 0 CHECK (initial_percent BETWEEN 0 AND 100),
    initial_done INTEGER NOT NULL DEFAULT 0 CHECK (initial_done IN (0, 1)),
    backlog_bytes INTEGER NOT NULL DEFAULT 0 CHECK (backlog_bytes >= 0),
    rate_in REAL NOT NULL DEFAULT 0 CHECK (rate_in >= 0),
    rate_out REAL NOT NULL DEFAULT 0 CHECK (rate_out >= 0),
    resync_required INTEGER NOT NULL DEFAULT 0 CHECK (resync_required IN (0, 1)),
    PRIMARY KEY (machine, disk_id)
) STRICT;

CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    subject TEXT NOT NULL,
    state TEXT NOT NULL,
    step TEXT NOT NULL DEFAULT '',
    step_index INTEGER NOT NULL DEFAULT 0 CHECK (step_index >= 0),
    percent REAL NOT NULL DEFAULT 0 CHECK (percent BETWEEN 0 AND 100),
    params TEXT NOT NULL,
    result TEXT,
    error TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    finished_at REAL
) STRICT;
-- At most one queued or running job per subject: the check and the insert are one
-- statement, so two callers racing to start a job cannot both win.
CREATE UNIQUE INDEX jobs_one_active_per_subject ON jobs (subject)
    WHERE state IN ('queued', 'running');
CREATE INDEX jobs_by_created ON jobs (created_at);

CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    severity TEXT NOT NULL,
    subject TEXT NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL
) STRICT;
CREATE INDEX events_by_time ON events (time);

CREATE TABLE alerts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    subject TEXT NOT NULL,
    kind TEXT NOT NULL,
    severity TEXT NOT NULL,
    message TEXT NOT NULL,
    raised_at REAL NOT NULL,
    cleared_at REAL
) STRICT;
CREATE UNIQUE INDEX alerts_one_open ON alerts (subject, kind) WHERE cleared_at IS NULL;

CREATE TABLE certificates (
    serial TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    issued_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    revoked_at REAL
) STRICT;
CREATE INDEX certificates_by_name ON certificates (name);
CREATE INDEX certificates_revoked ON certificates (serial) WHERE revoked_at IS NOT NULL;

CREATE TABLE csr_seen (
    fingerprint TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    seen_at REAL NOT NULL
) STRICT;
"""

# Failover: where a machine's VM goes (replica settings, checked by `replica.check`)
# and how far its failover has got (written by the failover jobs only).
_V2 = """
ALTER TABLE machines ADD COLUMN replica TEXT;
ALTER TABLE machines ADD COLUMN failover TEXT;
"""

# Failback: the generation asked of the agent, the newest it finished (the job waits
# for done >= requested), and the figures or error of its last attempt.
_V3 = """
ALTER TABLE machines ADD COLUMN failback_requested INTEGER NOT NULL DEFAULT 0
    CHECK (failback_requested >= 0);
ALTER TABLE machines ADD COLUMN failback_done INTEGER NOT NULL DEFAULT 0
    CHECK (failback_done >= 0);
ALTER TABLE machines ADD COLUMN failback_result TEXT;
"""

# Consistency groups: how often their members take a common point (groups.py).
_V4 = """
ALTER TABLE groups ADD COLUMN interval_s REAL NOT NULL DEFAULT 300 CHECK (interval_s > 0);
"""

MIGRATIONS: tuple[str, ...] = (_V1, _V2, _V3, _V4)


class SchemaTooNew(ConfigServerError):
    """The database was written by a newer release; refusing to guess its meaning."""


def statements(script: str) -> list[str]:
    """Split ``script`` into complete statements (sqlite3_complete knows triggers)."""
    out: list[str] = []
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            out.append(pending.strip())
            pending = ""
    if pending.strip() and not pending.strip().startswith("--"):
        raise ValueError(f"incomplete SQL statement at the end of a migration: {pending!r}")
    return out


def schema_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(
    conn: sqlite3.Connection, migrations: tuple[str, ...] = MIGRATIONS, *, where: str = ""
) -> int:
    """Bring ``conn``'s schema up to ``len(migrations)``; returns the version reached.

    ``conn`` must be in autocommit mode (``isolation_level=None``) so the transactions
    here are the only ones. The version is re-read inside each transaction: a second
    process migrating at the same moment then finds the work done and skips it.
    """
    known = len(migrations)
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = schema_version(conn)
            if version > known:
                raise SchemaTooNew(
                    f"inventory {where} has schema version {version}, newer than this "
                    f"software knows ({known}); upgrade secondsite or restore a backup"
                )
            if version == known:
                conn.execute("COMMIT")
                return version
            for statement in statements(migrations[version]):
                conn.execute(statement)
            # PRAGMA takes no parameters; the value is an int we computed.
            conn.execute(f"PRAGMA user_version = {version + 1:d}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise


SITE_KINDS = ("primary", "secondary")
POINT_KINDS = ("crash", "app")
MAX_NAME = 255

JSON_COLUMNS = frozenset(
    {"stats", "agent", "spec", "params", "result", "replica", "failover", "failback_result"}
)
BOOL_COLUMNS = frozenset({"protection_enabled", "replicating", "initial_done", "resync_required"})
# SHA-1 (20 bytes, what vSphere shows) or SHA-256 (32), with or without colons.
_THUMBPRINT = re.compile(r"[0-9A-Fa-f]{2}(?:(?::?[0-9A-Fa-f]{2}){19}|(?::?[0-9A-Fa-f]{2}){31})")
_SERIAL = re.compile(r"[0-9a-f]{1,64}")

Check = Callable[[str, Any], Any]


# -- column values: each check returns the value as stored, or raises InvalidArgument --


def _require_that(ok: bool, what: str, must: str, value: Any) -> None:
    if not ok:
        raise InvalidArgument(f"{what} must be {must}, got {value!r}")


def opt(check: Check) -> Check:
    """The same check, letting None (SQL NULL) through."""
    return lambda what, value: None if value is None else check(what, value)


def name(what: str, value: Any) -> str:
    printable = isinstance(value, str) and not any(ord(c) < 32 or c == "\x7f" for c in value)
    _require_that(printable and 0 < len(value) <= MAX_NAME, what, "a printable name", value)
    return str(value)


def text(what: str, value: Any) -> str:
    _require_that(isinstance(value, str), what, "a string", value)
    return str(value)


def number(what: str, value: Any) -> float:
    # bool is an int subclass, but True as "1 second" is always a caller bug.
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    _require_that(ok, what, "a finite number", value)
    return float(value)


def positive(what: str, value: Any) -> float:
    _require_that(number(what, value) > 0, what, "positive", value)
    return float(value)


def non_negative(what: str, value: Any) -> float:
    _require_that(number(what, value) >= 0, what, "non-negative", value)
    return float(value)


def percent(what: str, value: Any) -> float:
    _require_that(0 <= number(what, value) <= 100, what, "between 0 and 100", value)
    return float(value)


def count(what: str, value: Any) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    _require_that(ok, what, "a non-negative integer", value)
    return int(value)


def positive_int(what: str, value: Any) -> int:
    _require_that(count(what, value) > 0, what, "a positive integer", value)
    return int(value)


def flag(what: str, value: Any) -> int:
    _require_that(isinstance(value, bool), what, "true or false", value)
    return int(value)


def json_text(what: str, value: Any) -> str:
    _require_that(isinstance(value, dict), what, "a mapping", value)
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"{what} is not JSON-serialisable: {exc}") from exc


def choice(what: str, value: Any, allowed: tuple[str, ...]) -> str:
    _require_that(value in allowed, what, f"one of {', '.join(allowed)}", value)
    return str(value)


def enum(what: str, value: Any, choices: type[Any]) -> str:
    return choice(what, value, tuple(member.value for member in choices))


def address(what: str, value: Any) -> str:
    host, sep, port = name(what, value).rpartition(":")
    ok = bool(sep and host) and port.isdigit() and 0 < int(port) < 65536
    _require_that(ok, what, "host:port", value)
    return str(value)


def thumbprint(what: str, value: Any) -> str:
    ok = isinstance(value, str) and _THUMBPRINT.fullmatch(value) is not None
    _require_that(ok, what, "a hex SHA-1 or SHA-256 digest", value)
    return str(value)


def serial(value: Any) -> str:
    # Serials are compared as text, so one spelling: lower-case hex, no leading zeros.
    ok = isinstance(value, str) and _SERIAL.fullmatch(value.lower()) is not None
    _require_that(ok, "certificate serial", "hex", value)
    return str(value).lower().lstrip("0") or "0"


opt_name, opt_text, opt_number = opt(name), opt(text), opt(number)
opt_count, opt_json, opt_thumbprint = opt(count), opt(json_text), opt(thumbprint)


def checked(kind: str, fields: Mapping[str, Any], checks: Mapping[str, Check]) -> dict[str, Any]:
    unknown = sorted(set(fields) - set(checks))
    if unknown:
        raise InvalidArgument(
            f"unknown {kind} field(s) {', '.join(unknown)}; known: {', '.join(sorted(checks))}"
        )
    return {key: checks[key](key, value) for key, value in fields.items()}


POLICY_FIELDS: dict[str, Check] = {
    "rpo_threshold_s": positive,
    "crash_interval_s": positive,
    "app_interval_s": positive,
    "retention_hours": positive,
    "retention_bytes": opt_count,
    "pre_script": opt_text,
    "post_script": opt_text,
}
# Placement (process_server, master_target) and policy are checked against their
# tables as well, in update_machine. state has its own method because of state_since.
MACHINE_FIELDS: dict[str, Check] = {
    "hostname": name,
    "site": opt_name,
    "policy": name,
    "process_server": opt_name,
    "master_target": opt_name,
    "group_name": opt_name,
    "protection_enabled": flag,
    "replicating": flag,
    "resync_requested": count,
    "resync_done": count,
    "last_seen": opt_number,
    "newest_point_time": opt_number,
    "newest_point_tag": opt_name,
    "newest_point_kind": opt(lambda what, v: choice(what, v, POINT_KINDS)),
    "newest_app_point_time": opt_number,
    "agent": opt_json,
    "replica": opt(lambda what, v: json_text(what, replica.check(what, v))),
    "failover": opt_json,
    "failback_requested": count,
    "failback_done": count,
    "failback_result": opt_json,
}
DISK_FIELDS: dict[str, Check] = {
    "initial_percent": percent,
    "initial_done": flag,
    "backlog_bytes": count,
    "rate_in": non_negative,
    "rate_out": non_negative,
    "resync_required": flag,
}
DISK_FACTS: dict[str, Check] = {
    "disk_id": name,
    "path": name,
    "size_bytes": positive_int,
    "sector_size": positive_int,
}
JOB_FIELDS: dict[str, Check] = {
    "state": lambda what, v: enum(what, v, JobState),
    "step": text,
    "step_index": count,
    "percent": percent,
    "params": opt_json,  # a step may pin a value it chose (a resync generation)
    "result": opt_json,
    "error": opt_text,
    "updated_at": number,
    "finished_at": opt_number,
}


def records(cursor: sqlite3.Cursor) -> list[Record]:
    """Rows as dicts keyed by column name, JSON decoded and 0/1 flags as bool."""
    names = [d[0] for d in cursor.description]
    decode: list[tuple[str, Callable[[Any], Any]]] = [
        (n, json.loads if n in JSON_COLUMNS else bool)
        for n in names
        if n in JSON_COLUMNS or n in BOOL_COLUMNS
    ]
    out = []
    for row in cursor:
        record = dict(zip(names, row, strict=True))
        for column, fn in decode:
            if record[column] is not None:
                record[column] = fn(record[column])
        out.append(record)
    return out
