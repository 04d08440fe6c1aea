"""The configuration server's inventory: one SQLite database (WAL) in the state dir.

Everything the configuration server knows about the estate lives here: policies,
sites, vCenters, process servers and master targets, protected machines and their
disks, jobs, events, alerts and the certificates it issued. Credentials are not: they
are in a root-only file kept by another module.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from appliance.config import migrations as col
from appliance.config.api import Record
from appliance.config.errors import ConfigServerError, Conflict, InvalidArgument, NotFound
from appliance.config.migrations import MIGRATIONS, migrate
from appliance.config.model import (
    AlertKind,
    ComponentKind,
    JobKind,
    JobState,
    MachineState,
    ServerRole,
    Severity,
)

BUSY_TIMEOUT_S = 10.0
ACTIVE_JOB_STATES = (JobState.QUEUED.value, JobState.RUNNING.value)


def _set_clause(fields: Mapping[str, Any]) -> str:
    # Keys come from the field tables in `migrations`, never unchecked from a caller.
    return ", ".join(f"{key} = ?" for key in fields)


class Inventory:
    """Typed access to the inventory database.

    On-disk format: a SQLite 3 database in WAL mode, written with ``synchronous=FULL``
    (a returned write survives power loss) and ``foreign_keys=ON``. ``PRAGMA
    user_version`` is the number of applied scripts of `migrations.MIGRATIONS`; a
    database with a higher number is refused. All tables are STRICT. Times are REAL
    Unix seconds supplied by the caller; enum columns hold the `model` values; JSON
    columns hold a JSON object (text); flags are INTEGER 0/1. Schema version 1::

        policies(name PK, rpo_threshold_s REAL >0 =900, crash_interval_s REAL >0 =5,
                 app_interval_s REAL >0 =3600, retention_hours REAL >0 =24,
                 retention_bytes INTEGER >=0 NULL, pre_script NULL, post_script NULL)
                 -- row 'default' created by migration 1
        sites(name PK, kind 'primary'|'secondary')
        vcenters(name PK, site -> sites, address, thumbprint NULL)
        servers(name PK, role ServerRole, address 'host:port', site NULL,
                target NULL (a process server's master target, name or host:port),
                enrolled_at NULL, last_seen NULL, stats JSON NULL,
                capacity_bytes NULL, free_bytes NULL)
        groups(name PK, policy -> policies NULL)
        plans(name PK, spec JSON)
        machines(name PK, hostname, site NULL, policy -> policies ='default',
                 process_server -> servers NULL, master_target -> servers NULL,
                 group_name -> groups NULL, protection_enabled flag,
                 replicating flag (the agent says it streams),
                 resync_requested INTEGER, resync_done INTEGER (resync generations:
                 asked of the agent, and completed by it),
                 state MachineState, state_since, last_seen NULL,
                 newest_point_time NULL, newest_point_tag NULL (tag id),
                 newest_point_kind 'crash'|'app' NULL, newest_app_point_time NULL,
                 agent JSON NULL (version, os, kernel, tracker), created_at)
        disks(machine -> machines ON DELETE CASCADE, disk_id, path, size_bytes >0,
              sector_size >0, initial_percent 0..100, initial_done flag,
              backlog_bytes >=0, rate_in >=0, rate_out >=0, resync_required flag,
              PK (machine, disk_id))
        jobs(id PK, kind JobKind, subject, state JobState, step, step_index, percent,
             params JSON, result JSON NULL, error NULL, created_at, updated_at,
             finished_at NULL)  -- unique (subject) WHERE state IN (queued, running)
        events(id INTEGER PK AUTOINCREMENT, time, severity Severity, subject, kind,
               message)
        alerts(id INTEGER PK AUTOINCREMENT, subject, kind AlertKind,
               severity Severity, message, raised_at, cleared_at NULL)
               -- unique (subject, kind) WHERE cleared_at IS NULL
        certificates(serial PK lower-case hex, name, kind ComponentKind, issued_at,
                     expires_at, revoked_at NULL)
        csr_seen(fingerprint PK, name, seen_at)  -- CSRs already used to enrol

    Machines' ``site`` and servers' ``site`` are free text (a component may enrol
    before the operator names its site); vCenters' ``site`` must exist.

    One ``sqlite3.Connection`` is owned by the instance. It is opened with
    ``check_same_thread=False`` so the object may be handed between threads (the
    asyncio loop and an executor), but only one thread may use it at a time. Each
    mutating method is one transaction; `transaction()` groups several into one.
    """

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path
        self._depth = 0

    @classmethod
    def open(cls, path: Path) -> Inventory:
        """Open (creating if needed) and migrate the database at ``path``."""
        conn = sqlite3.connect(
            path, isolation_level=None, timeout=BUSY_TIMEOUT_S, check_same_thread=False
        )
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise ConfigServerError(f"inventory {path}: cannot use WAL (got {mode!r})")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            migrate(conn, MIGRATIONS, where=str(path))
        except BaseException:
            conn.close()
            raise
        return cls(conn, path)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Inventory:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One atomic unit: BEGIN IMMEDIATE outside, a SAVEPOINT when nested.

        An error rolls back to where this block began and propagates, so a caller
        that catches it inside an outer block still holds a consistent state.
        """
        conn = self._conn
        depth = self._depth
        savepoint = f"sp{depth}"
        conn.execute("BEGIN IMMEDIATE" if depth == 0 else f"SAVEPOINT {savepoint}")
        self._depth += 1
        try:
            yield
        except BaseException:
            if depth == 0:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            else:
                conn.execute(f"ROLLBACK TO {savepoint}")
                conn.execute(f"RELEASE {savepoint}")
            raise
        else:
            conn.execute("COMMIT" if depth == 0 else f"RELEASE {savepoint}")
        finally:
            self._depth = depth

    def _one(self, sql: str, args: tuple[Any, ...], missing: str) -> Record:
        rows = col.records(self._conn.execute(sql, args))
        if not rows:
            raise NotFound(missing)
        return rows[0]

    def _exists(self, table: str, name: str) -> bool:
        sql = f"SELECT 1 FROM {table} WHERE name = ?"  # table names are ours
        return self._conn.execute(sql, (name,)).fetchone() is not None

    def _require(self, table: str, what: str, name: str) -> None:
        if not self._exists(table, name):
            raise NotFound(f"no {what} named {name!r}")

    # -- policies -------------------------------------------------------------------

    def policies(self) -> list[Record]:
        return col.records(self._conn.execute("SELECT * FROM policies ORDER BY name"))

    def policy(self, name: str) -> Record:
        return self._one("SELECT * FROM policies WHERE name = ?", (name,), f"no policy {name!r}")

    def set_policy(self, name: str, /, **settings: Any) -> Record:
        """Create the policy with defaults, or update it; only the given keys change."""
        col.name("policy name", name)
        values = col.checked("policy", settings, col.POLICY_FIELDS)
        with self.transaction():
            self._conn.execute("INSERT OR IGNORE INTO policies (name) VALUES (?)", (name,))
            if values:
                self._conn.execute(
                    f"UPDATE policies SET {_set_clause(values)} WHERE name = ?",
                    (*values.values(), name),
                )
        return self.policy(name)

    # -- sites and vCenters ---------------------------------------------------------

    def add_site(self, name: str, kind: str) -> Record:
        values = (col.name("site name", name), col.choice("site kind", kind, col.SITE_KINDS))
        try:
            self._conn.execute("INSERT INTO sites (name, kind) VALUES (?, ?)", values)
        except sqlite3.IntegrityError as exc:
            raise Conflict(f"site {name!r} already exists") from exc
        return {"name": values[0], "kind": values[1]}

    def sites(self) -> list[Record]:
        return col.records(self._conn.execute("SELECT * FROM sites ORDER BY name"))

    def add_vcenter(self, name: str, site: str, address: str, thumbprint: str | None) -> Record:
        values = (
            col.name("vCenter name", name),
            col.name("site", site),
            col.name("vCenter address", address),
            col.opt_thumbprint("thumbprint", thumbprint),
        )
        with self.transaction():
            self._require("sites", "site", site)
            if self._exists("vcenters", name):
                raise Conflict(f"vCenter {name!r} already exists")
            self._conn.execute("INSERT INTO vcenters VALUES (?, ?, ?, ?)", values)
        return self._vcenter(name)

    def _vcenter(self, name: str) -> Record:
        sql = "SELECT * FROM vcenters WHERE name = ?"
        return self._one(sql, (name,), f"no vCenter named {name!r}")

    def vcenters(self) -> list[Record]:
        return col.records(self._conn.execute("SELECT * FROM vcenters ORDER BY name"))

    def set_vcenter_thumbprint(self, name: str, thumbprint: str | None) -> Record:
        value = col.opt_thumbprint("thumbprint", thumbprint)
        cur = self._conn.execute("UPDATE vcenters SET thumbprint = ? WHERE name = ?", (value, name))
        if cur.rowcount == 0:
            raise NotFound(f"no vCenter named {name!r}")
        return self._vcenter(name)

    # -- process servers and master targets -----------------------------------------

    def upsert_server(
        self,
        name: str,
        role: ServerRole | str,
        address: str,
        *,
        site: str | None = None,
        target: str | None = None,
        now: float | None = None,
    ) -> Record:
        """Register a server or refresh its address, site and target.

        ``target`` (process servers only) is what the server says it forwards to, a
        name or a host:port, kept as text: a process server may enrol before its
        master target. ``enrolled_at`` is ``now`` at first registration (NULL if not
        given) and never changes after. A server's role is fixed (its certificate
        names it): re-registering with another role is a Conflict.
        """
        col.name("server name", name)
        role_value = col.enum("server role", role, ServerRole)
        values = (
            col.address("server address", address),
            col.opt_name("site", site),
            col.opt_name("target", target),
        )
        when = col.opt_number("now", now)
        if target is not None and role_value != ServerRole.PROCESS:
            raise InvalidArgument(f"only a process server has a target; {name!r} is {role}")
        with self.transaction():
            row = self._conn.execute("SELECT role FROM servers WHERE name = ?", (name,)).fetchone()
            if row is None:
                self._conn.execute(
                    "INSERT INTO servers (name, role, address, site, target, enrolled_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (name, role_value, *values, when),
                )
            elif row[0] != role_value:
                raise Conflict(f"server {name!r} is registered as {row[0]}, not {role_value}")
            else:
                self._conn.execute(
                    "UPDATE servers SET address = ?, site = ?, target = ? WHERE name = ?",
                    (*values, name),
                )
        return self.server(name)

    def server(self, name: str) -> Record:
        sql = "SELECT * FROM servers WHERE name = ?"
        return self._one(sql, (name,), f"no server named {name!r}")

    def servers(self, role: ServerRole | str | None = None) -> list[Record]:
        if role is None:
            return col.records(self._conn.execute("SELECT * FROM servers ORDER BY name"))
        value = col.enum("server role", role, ServerRole)
        sql = "SELECT * FROM servers WHERE role = ? ORDER BY name"
        return col.records(self._conn.execute(sql, (value,)))

    def record_server_report(
        self,
        name: str,
        *,
        last_seen: float,
        stats: dict[str, Any],
        capacity_bytes: int | None,
        free_bytes: int | None,
    ) -> None:
        values = (
            col.number("last_seen", last_seen),
            col.json_text("stats", stats),
            col.opt_count("capacity_bytes", capacity_bytes),
            col.opt_count("free_bytes", free_bytes),
        )
        cur = self._conn.execute(
            "UPDATE servers SET last_seen = ?, stats = ?, capacity_bytes = ?, free_bytes = ?"
            " WHERE name = ?",
            (*values, name),
        )
        if cur.rowcount == 0:
            raise NotFound(f"no server named {name!r}")

    # -- machines -------------------------------------------------------------------

    def add_machine(
        self,
        name: str,
        hostname: str,
        *,
        policy: str = "default",
        site: str | None = None,
        agent: dict[str, Any] | None = None,
        now: float,
    ) -> Record:
        values = (
            col.name("machine name", name),
            col.name("hostname", hostname),
            col.opt_name("site", site),
            col.name("policy", policy),
            col.opt_json("agent", agent),
            MachineState.REGISTERED.value,
            col.number("now", now),
        )
        with self.transaction():
            self._require("policies", "policy", policy)
            if self._exists("machines", name):
                raise Conflict(f"machine {name!r} already exists")
            self._conn.execute(
                "INSERT INTO machines (name, hostname, site, policy, agent, state,"
                " state_since, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?7)",
                values,
            )
        return self.machine(name)

    def machine(self, name: str) -> Record:
        sql = "SELECT * FROM machines WHERE name = ?"
        return self._one(sql, (name,), f"no machine named {name!r}")

    def machines(self) -> list[Record]:
        return col.records(self._conn.execute("SELECT * FROM machines ORDER BY name"))

    def update_machine(self, name: str, /, **fields: Any) -> Record:
        """Change some of a machine's columns (`migrations.MACHINE_FIELDS`)."""
        values = col.checked("machine", fields, col.MACHINE_FIELDS)
        with self.transaction():
            if not self._update_machine(name, values):
                raise NotFound(f"no machine named {name!r}")
        return self.machine(name)

    def update_machines_bulk(self, rows: list[tuple[str, dict[str, Any]]]) -> list[str]:
        """`update_machine` for many machines in one transaction (report flushes).

        All rows are checked first; a bad one fails the batch. A machine deleted
        meanwhile is skipped, not fatal; the skipped names are returned.
        """
        checked = [(name, col.checked("machine", f, col.MACHINE_FIELDS)) for name, f in rows]
        with self.transaction():
            return [name for name, values in checked if not self._update_machine(name, values)]

    def _update_machine(self, name: str, values: dict[str, Any]) -> bool:
        if "policy" in values:
            self._require("policies", "policy", values["policy"])
        if values.get("group_name") is not None:
            self._require("groups", "group", values["group_name"])
        for column, role in (
            ("process_server", ServerRole.PROCESS),
            ("master_target", ServerRole.TARGET),
        ):
            if values.get(column) is not None:
                found = self.server(values[column])
                if found["role"] != role:
                    raise InvalidArgument(f"{column} {values[column]!r} is a {found['role']}")
        if not values:
            return self._exists("machines", name)
        sql = f"UPDATE machines SET {_set_clause(values)} WHERE name = ?"
        return self._conn.execute(sql, (*values.values(), name)).rowcount == 1

    def set_machine_state(self, name: str, state: MachineState | str, now: float) -> bool:
        """Set the state; True if it changed (``state_since`` moves only then)."""
        values = (col.enum("machine state", state, MachineState), col.number("now", now), name)
        cur = self._conn.execute(
            "UPDATE machines SET state = ?1, state_since = ?2 WHERE name = ?3 AND state != ?1",
            values,
        )
        if cur.rowcount == 0:
            self._require("machines", "machine", name)
            return False
        return True

    def delete_machine(self, name: str) -> None:
        """Forget a machine; its disks go with it (ON DELETE CASCADE)."""
        cur = self._conn.execute("DELETE FROM machines WHERE name = ?", (name,))
        if cur.rowcount == 0:
            raise NotFound(f"no machine named {name!r}")

    def machine_load(self) -> dict[str, int]:
        """Machines placed on each server (every known server, 0 if none)."""
        rows = self._conn.execute(
            "SELECT s.name,"
            " (SELECT count(*) FROM machines WHERE process_server = s.name)"
            " + (SELECT count(*) FROM machines WHERE master_target = s.name)"
            " FROM servers AS s ORDER BY s.name"
        )
        return {name: count for name, count in rows}

    # -- disks ----------------------------------------------------------------------

    def set_disks(self, machine: str, disks: list[dict[str, Any]]) -> list[Record]:
        """Replace the disk set reported by an agent.

        Disks that stay keep their replication progress (a re-report is not a reason
        to start over); disks that vanished are removed. Every entry must carry exactly
        disk_id, path, size_bytes and sector_size.
        """
        facts = []
        for disk in disks:
            if not isinstance(disk, dict) or set(disk) != set(col.DISK_FACTS):
                raise InvalidArgument(
                    f"each disk needs exactly {', '.join(col.DISK_FACTS)}; got {disk!r}"
                )
            facts.append(col.checked("disk", disk, col.DISK_FACTS))
        ids = [f["disk_id"] for f in facts]
        if len(set(ids)) != len(ids):
            raise InvalidArgument(f"duplicate disk ids for machine {machine!r}: {ids}")
        with self.transaction():
            self._require("machines", "machine", machine)
            sql = "SELECT disk_id FROM disks WHERE machine = ?"
            known = {r[0] for r in self._conn.execute(sql, (machine,))}
            self._conn.executemany(
                "DELETE FROM disks WHERE machine = ? AND disk_id = ?",
                [(machine, gone) for gone in sorted(known - set(ids))],
            )
            self._conn.executemany(
                "INSERT INTO disks (machine, disk_id, path, size_bytes, sector_size)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (machine, disk_id) DO UPDATE SET"
                " path = excluded.path, size_bytes = excluded.size_bytes,"
                " sector_size = excluded.sector_size",
                [
                    (machine, f["disk_id"], f["path"], f["size_bytes"], f["sector_size"])
                    for f in facts
                ],
            )
        return self.disks(machine)

    def disks(self, machine: str) -> list[Record]:
        sql = "SELECT * FROM disks WHERE machine = ? ORDER BY disk_id"
        rows = col.records(self._conn.execute(sql, (machine,)))
        if not rows:
            self._require("machines", "machine", machine)
        return rows

    def all_disks(self) -> list[Record]:
        return col.records(self._conn.execute("SELECT * FROM disks ORDER BY machine, disk_id"))

    def update_disk(self, machine: str, disk_id: str, /, **fields: Any) -> Record:
        values = col.checked("disk", fields, col.DISK_FIELDS)
        where = (machine, disk_id)
        if values:
            cur = self._conn.execute(
                f"UPDATE disks SET {_set_clause(values)} WHERE machine = ? AND disk_id = ?",
                (*values.values(), *where),
            )
            if cur.rowcount == 0:
                self._require("machines", "machine", machine)
        sql = "SELECT * FROM disks WHERE machine = ? AND disk_id = ?"
        return self._one(sql, where, f"machine {machine!r} has no disk {disk_id!r}")

    def update_disks_bulk(
        self, rows: list[tuple[str, str, dict[str, Any]]]
    ) -> list[tuple[str, str]]:
        """Apply many disk updates in one transaction (agent and server heartbeats).

        Every row is checked before anything is written; a bad one fails the batch.
        A disk that no longer exists is skipped, not fatal: a heartbeat racing a
        set_disks must not throw away everyone else's progress. Returns the skipped
        (machine, disk_id) pairs.
        """
        checked = [(m, d, col.checked("disk", f, col.DISK_FIELDS)) for m, d, f in rows]
        missing = []
        with self.transaction():
            for machine, disk_id, values in checked:
                if not values:
                    continue
                cur = self._conn.execute(
                    f"UPDATE disks SET {_set_clause(values)} WHERE machine = ? AND disk_id = ?",
                    (*values.values(), machine, disk_id),
                )
                if cur.rowcount == 0:
                    missing.append((machine, disk_id))
        return missing

    # -- groups and plans -----------------------------------------------------------

    def set_group(self, name: str, policy: str | None = None) -> Record:
        values = (col.name("group name", name), col.opt_name("policy", policy))
        with self.transaction():
            if policy is not None:
                self._require("policies", "policy", policy)
            self._conn.execute(
                "INSERT INTO groups (name, policy) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET policy = excluded.policy",
                values,
            )
        return {"name": name, "policy": policy}

    def groups(self) -> list[Record]:
        return col.records(self._conn.execute("SELECT * FROM groups ORDER BY name"))

    def set_group_interval(self, name: str, interval_s: float) -> None:
        """How often the group's members take a common point (seconds)."""
        value = col.positive("group interval", interval_s)
        cur = self._conn.execute("UPDATE groups SET interval_s = ? WHERE name = ?", (value, name))
        if cur.rowcount == 0:
            raise NotFound(f"no group named {name!r}")

    def delete_group(self, name: str) -> None:
        """Forget a group; its members leave it (their points stay)."""
        with self.transaction():
            self._require("groups", "group", name)
            self._conn.execute("UPDATE machines SET group_name = NULL WHERE group_name = ?",
                               (name,))  # fmt: skip
            self._conn.execute("DELETE FROM groups WHERE name = ?", (name,))

    def set_plan(self, name: str, spec: dict[str, Any]) -> Record:
        values = (col.name("plan name", name), col.json_text("plan spec", spec))
        self._conn.execute(
            "INSERT INTO plans (name, spec) VALUES (?, ?)"
            " ON CONFLICT (name) DO UPDATE SET spec = excluded.spec",
            values,
        )
        return self.plan(name)

    def plan(self, name: str) -> Record:
        return self._one("SELECT * FROM plans WHERE name = ?", (name,), f"no plan named {name!r}")

    def plans(self) -> list[Record]:
        return col.records(self._conn.execute("SELECT * FROM plans ORDER BY name"))

    # -- jobs -----------------------------------------------------------------------

    def add_job(
        self, id: str, kind: JobKind | str, subject: str, params: dict[str, Any], now: float
    ) -> Record:
        """Queue a job. Conflict if the id is taken or the subject has an active job."""
        values = (
            col.name("job id", id),
            col.enum("job kind", kind, JobKind),
            col.name("job subject", subject),
            JobState.QUEUED.value,
            col.json_text("job params", params),
            col.number("now", now),
        )
        with self.transaction():
            if self._conn.execute("SELECT 1 FROM jobs WHERE id = ?", (id,)).fetchone():
                raise Conflict(f"job {id!r} already exists")
            active = self.active_job_for(subject)
            if active is not None:
                raise Conflict(
                    f"{subject!r} already has job {active['id']} ({active['kind']}, "
                    f"{active['state']})"
                )
            self._conn.execute(
                "INSERT INTO jobs (id, kind, subject, state, params, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?6, ?6)",
                values,
            )
        return self.job(id)

    def job(self, id: str) -> Record:
        return self._one("SELECT * FROM jobs WHERE id = ?", (id,), f"no job {id!r}")

    def jobs(self, include_finished: bool) -> list[Record]:
        if include_finished:
            return col.records(self._conn.execute("SELECT * FROM jobs ORDER BY created_at, id"))
        return self.unfinished_jobs()

    def update_job(self, id: str, /, **fields: Any) -> Record:
        values = col.checked("job", fields, col.JOB_FIELDS)
        if values:
            try:
                cur = self._conn.execute(
                    f"UPDATE jobs SET {_set_clause(values)} WHERE id = ?", (*values.values(), id)
                )
            except sqlite3.IntegrityError as exc:
                # Only the one-active-job index can fail here: re-queuing a finished job
                # whose subject has since got another one.
                raise Conflict(f"job {id!r}: its subject already has an active job") from exc
            if cur.rowcount == 0:
                raise NotFound(f"no job {id!r}")
        return self.job(id)

    def unfinished_jobs(self) -> list[Record]:
        """Queued or running jobs, oldest first (what a restarted server resumes)."""
        sql = "SELECT * FROM jobs WHERE state IN (?, ?) ORDER BY created_at, id"
        return col.records(self._conn.execute(sql, ACTIVE_JOB_STATES))

    def active_job_for(self, subject: str) -> Record | None:
        sql = "SELECT * FROM jobs WHERE subject = ? AND state IN (?, ?)"
        rows = col.records(self._conn.execute(sql, (subject, *ACTIVE_JOB_STATES)))
        return rows[0] if rows else None

    # -- events and alerts ----------------------------------------------------------

    def add_event(
        self, severity: Severity | str, subject: str, kind: str, message: str, now: float
    ) -> int:
        values = (
            col.number("now", now),
            col.enum("severity", severity, Severity),
            col.text("event subject", subject),
            col.name("event kind", kind),
            col.text("event message", message),
        )
        cur = self._conn.execute(
            "INSERT INTO events (time, severity, subject, kind, message) VALUES (?, ?, ?, ?, ?)",
            values,
        )
        assert cur.lastrowid is not None  # an INSERT into a rowid table always sets it
        return cur.lastrowid

    def events(self, limit: int) -> list[Record]:
        """The newest ``limit`` events, newest first."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
            raise InvalidArgument(f"limit must be a positive integer, got {limit!r}")
        sql = "SELECT * FROM events ORDER BY id DESC LIMIT ?"
        return col.records(self._conn.execute(sql, (limit,)))

    def prune_events(self, before: float) -> int:
        """Delete events older than ``before``; returns how many (keeps the table bounded)."""
        cur = self._conn.execute(
            "DELETE FROM events WHERE time < ?", (col.number("before", before),)
        )
        return cur.rowcount

    def raise_alert(
        self,
        subject: str,
        kind: AlertKind | str,
        severity: Severity | str,
        message: str,
        now: float,
    ) -> Record | None:
        """Open an alert; None if one is already open for (subject, kind).

        In that case the open alert takes the new message and severity, and keeps its
        ``raised_at`` — the alert is the same condition, still going on.
        """
        values = (
            col.name("alert subject", subject),
            col.enum("alert kind", kind, AlertKind),
            col.enum("severity", severity, Severity),
            col.text("alert message", message),
            col.number("now", now),
        )
        with self.transaction():
            cur = self._conn.execute(
                "INSERT OR IGNORE INTO alerts (subject, kind, severity, message, raised_at)"
                " VALUES (?, ?, ?, ?, ?)",
                values,
            )
            if cur.rowcount == 0:
                self._conn.execute(
                    "UPDATE alerts SET severity = ?3, message = ?4"
                    " WHERE subject = ?1 AND kind = ?2 AND cleared_at IS NULL",
                    values[:4],
                )
                return None
            row_id = cur.lastrowid
        return self._one("SELECT * FROM alerts WHERE id = ?", (row_id,), f"alert {row_id}")

    def clear_alert(self, subject: str, kind: AlertKind | str, now: float) -> Record | None:
        """Clear the open alert for (subject, kind); None if there was none."""
        values = (col.number("now", now), subject, col.enum("alert kind", kind, AlertKind))
        rows = col.records(
            self._conn.execute(
                "UPDATE alerts SET cleared_at = ? WHERE subject = ? AND kind = ?"
                " AND cleared_at IS NULL RETURNING *",
                values,
            )
        )
        return rows[0] if rows else None

    def alerts(self, include_cleared: bool) -> list[Record]:
        """Alerts newest first; only open ones unless ``include_cleared``."""
        where = "" if include_cleared else " WHERE cleared_at IS NULL"
        return col.records(self._conn.execute(f"SELECT * FROM alerts{where} ORDER BY id DESC"))

    def open_alerts_count(self) -> int:
        sql = "SELECT count(*) FROM alerts WHERE cleared_at IS NULL"
        return int(self._conn.execute(sql).fetchone()[0])

    # -- certificates ---------------------------------------------------------------

    def add_certificate(
        self,
        serial: str,
        name: str,
        kind: ComponentKind | str,
        issued_at: float,
        expires_at: float,
    ) -> Record:
        key = col.serial(serial)
        values = (
            key,
            col.name("certificate name", name),
            col.enum("component kind", kind, ComponentKind),
            col.number("issued_at", issued_at),
            col.number("expires_at", expires_at),
        )
        if values[4] <= values[3]:
            raise InvalidArgument(f"certificate {serial} expires before it is issued")
        try:
            self._conn.execute(
                "INSERT INTO certificates (serial, name, kind, issued_at, expires_at)"
                " VALUES (?, ?, ?, ?, ?)",
                values,
            )
        except sqlite3.IntegrityError as exc:
            raise Conflict(f"certificate serial {key} already recorded") from exc
        return self.certificate(key)

    def certificate(self, serial: str) -> Record:
        key = col.serial(serial)
        sql = "SELECT * FROM certificates WHERE serial = ?"
        return self._one(sql, (key,), f"no certificate with serial {serial}")

    def revoke(self, name: str, now: float) -> list[str]:
        """Revoke every certificate issued to ``name``; returns the newly revoked serials."""
        when = col.number("now", now)
        with self.transaction():
            self._require("certificates", "certificate holder", name)
            rows = self._conn.execute(
                "UPDATE certificates SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL"
                " RETURNING serial",
                (when, name),
            ).fetchall()
        return sorted(r[0] for r in rows)

    def revoked_serials(self) -> list[str]:
        sql = "SELECT serial FROM certificates WHERE revoked_at IS NOT NULL ORDER BY serial"
        return [r[0] for r in self._conn.execute(sql)]

    def is_revoked(self, serial: str) -> bool:
        """True only for a recorded, revoked serial (`certificate()` tells unknown apart)."""
        sql = "SELECT 1 FROM certificates WHERE serial = ? AND revoked_at IS NOT NULL"
        return self._conn.execute(sql, (col.serial(serial),)).fetchone() is not None

    def remember_csr(self, fingerprint: str, name: str, now: float) -> bool:
        """Record a CSR's fingerprint; False if it was seen before (a replay).

        One INSERT OR IGNORE, so the check and the record cannot be split by a crash
        or by a second enrolment racing with the same CSR.
        """
        values = (
            col.name("CSR fingerprint", fingerprint),
            col.name("name", name),
            col.number("now", now),
        )
        cur = self._conn.execute(
            "INSERT OR IGNORE INTO csr_seen (fingerprint, name, seen_at) VALUES (?, ?, ?)",
            values,
        )
        return cur.rowcount == 1

    # -- summary --------------------------------------------------------------------

    def counts(self) -> Record:
        by_state = {state.value: 0 for state in MachineState}
        for state, count in self._conn.execute(
            "SELECT state, count(*) FROM machines GROUP BY state"
        ):
            by_state[state] = count
        return {
            "machines": sum(by_state.values()),
            "protected": by_state[MachineState.PROTECTED.value],
            "by_state": by_state,
        }
