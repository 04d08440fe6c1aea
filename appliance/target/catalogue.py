"""The recovery-point catalogue: SQLite in WAL mode at ``<state>/catalogue.db``.

Schema (version 2; migrations are the ordered functions in ``MIGRATIONS``, the applied
count is the single row of ``schema_version``)::

    disks(disk_id TEXT PRIMARY KEY, machine_id TEXT NOT NULL, size INTEGER NOT NULL,
          vmdk TEXT NOT NULL,            -- descriptor path of the replica
          durable_seq INTEGER NOT NULL,  -- the replica holds the stream up to this seq
          checkpoint_lsn INTEGER NOT NULL,  -- journal end when durable_seq was reached
          created INTEGER NOT NULL,      -- time_ns
          fenced INTEGER NOT NULL DEFAULT 0)  -- 1: failed over, incoming data dropped
    points(disk_id TEXT REFERENCES disks, tag_id TEXT, seq INTEGER, lsn INTEGER,
           time_ns INTEGER, kind TEXT ('crash'|'app'), usable INTEGER (0|1),
           PRIMARY KEY (disk_id, tag_id))

A point's ``lsn`` is the journal end when its tag was applied: rolling the replica back
through every undo record at or after it reproduces the disk at the tag. A point and
the checkpoint it implies are committed in one transaction, so after a crash no point
lies beyond ``checkpoint_lsn``. ``synchronous=FULL``: a commit that returned survives
power loss. Each thread gets its own connection.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from appliance.storage.faults import FaultPoint, fault_point
from appliance.target.errors import AlreadyExists, StorageFull, TargetError

BUSY_TIMEOUT_MS = 10_000


@dataclass(frozen=True)
class DiskRow:
    disk_id: str
    machine_id: str
    size: int
    vmdk: str
    durable_seq: int
    checkpoint_lsn: int
    created: int


@dataclass(frozen=True)
class PointRow:
    disk_id: str
    tag_id: str
    seq: int
    lsn: int
    time_ns: int
    kind: str
    usable: bool


def _v1(conn: sqlite3.Connection) -> None:
    conn.execute(
        """CREATE TABLE disks (
            disk_id TEXT PRIMARY KEY,
            machine_id TEXT NOT NULL,
            size INTEGER NOT NULL CHECK (size > 0),
            vmdk TEXT NOT NULL,
            durable_seq INTEGER NOT NULL DEFAULT 0,
            checkpoint_lsn INTEGER NOT NULL DEFAULT 0,
            created INTEGER NOT NULL)"""
    )
    conn.execute(
        """CREATE TABLE points (
            disk_id TEXT NOT NULL REFERENCES disks(disk_id),
            tag_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            lsn INTEGER NOT NULL,
            time_ns INTEGER NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('crash', 'app')),
            usable INTEGER NOT NULL DEFAULT 1 CHECK (usable IN (0, 1)),
            PRIMARY KEY (disk_id, tag_id))"""
    )
    conn.execute("CREATE INDEX points_by_lsn ON points (disk_id, lsn)")
    conn.execute("CREATE INDEX disks_by_machine ON disks (machine_id)")


def _v2(conn: sqlite3.Connection) -> None:
    conn.execute("ALTER TABLE disks ADD COLUMN fenced INTEGER NOT NULL DEFAULT 0")


MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_v1, _v2)

_DISK_COLS = "disk_id, machine_id, size, vmdk, durable_seq, checkpoint_lsn, created"
_POINT_COLS = "p.disk_id, p.tag_id, p.seq, p.lsn, p.time_ns, p.kind, p.usable"


def _point(row: tuple[str, str, int, int, int, str, int]) -> PointRow:
    return PointRow(row[0], row[1], row[2], row[3], row[4], row[5], bool(row[6]))


class Catalogue:
    """Typed access to ``catalogue.db`` (schema in the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._migrate()

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            # check_same_thread=False only so close() can close every thread's
            # connection; each connection is still used by its own thread alone.
            conn = sqlite3.connect(
                self.path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000,
                check_same_thread=False,
            )  # fmt: skip
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT; rolled back on error; SQLITE_FULL -> StorageFull."""
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                fault_point(FaultPoint.CATALOGUE_COMMIT)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
                raise StorageFull(f"catalogue {self.path}: {exc}") from exc
            raise

    def _migrate(self) -> None:
        with self.transaction() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            version = 0 if row is None else int(row[0])
            if version > len(MIGRATIONS):
                raise TargetError(
                    f"{self.path} has schema version {version}, newer than this "
                    f"software ({len(MIGRATIONS)}); upgrade secondsite"
                )
            for migration in MIGRATIONS[version:]:
                migration(conn)
            if row is None:
                conn.execute("INSERT INTO schema_version VALUES (?)", (len(MIGRATIONS),))
            else:
                conn.execute("UPDATE schema_version SET version = ?", (len(MIGRATIONS),))

    def close(self) -> None:
        with self._conns_lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()
        self._local = threading.local()

    # -- disks -----------------------------------------------------------------------

    def add_disk(self, row: DiskRow) -> None:
        try:
            with self.transaction() as conn:
                conn.execute(
                    f"INSERT INTO disks ({_DISK_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (row.disk_id, row.machine_id, row.size, row.vmdk, row.durable_seq,
                     row.checkpoint_lsn, row.created),
                )  # fmt: skip
        except sqlite3.IntegrityError as exc:
            raise AlreadyExists(f"disk {row.disk_id} is already in the catalogue") from exc

    def disk(self, disk_id: str) -> DiskRow | None:
        row = (
            self._conn()
            .execute(f"SELECT {_DISK_COLS} FROM disks WHERE disk_id = ?", (disk_id,))
            .fetchone()
        )
        return None if row is None else DiskRow(*row)

    def disks(self, machine_id: str | None = None) -> list[DiskRow]:
        sql = f"SELECT {_DISK_COLS} FROM disks"
        args: tuple[str, ...] = ()
        if machine_id is not None:
            sql += " WHERE machine_id = ?"
            args = (machine_id,)
        return [DiskRow(*r) for r in self._conn().execute(sql + " ORDER BY disk_id", args)]

    def fenced(self, disk_id: str) -> bool:
        row = self._conn().execute("SELECT fenced FROM disks WHERE disk_id = ?", (disk_id,))
        value = row.fetchone()
        return bool(value and value[0])

    def set_fenced(self, disk_id: str, fenced: bool) -> None:
        with self.transaction() as conn:
            conn.execute("UPDATE disks SET fenced = ? WHERE disk_id = ?", (int(fenced), disk_id))

    def drop_points(self, disk_id: str) -> int:
        """Forget every point of the disk (a committed failover: the VM wrote to the
        replica without a journal, so no older point describes it any more)."""
        with self.transaction() as conn:
            return conn.execute("DELETE FROM points WHERE disk_id = ?", (disk_id,)).rowcount

    def set_checkpoint(self, disk_id: str, durable_seq: int, checkpoint_lsn: int) -> None:
        with self.transaction() as conn:
            conn.execute(
                "UPDATE disks SET durable_seq = ?, checkpoint_lsn = ? WHERE disk_id = ?",
                (durable_seq, checkpoint_lsn, disk_id),
            )

    # -- points ----------------------------------------------------------------------

    def add_point(self, point: PointRow, durable_seq: int, checkpoint_lsn: int) -> bool:
        """Record ``point`` and the checkpoint in one transaction.

        Returns False (checkpoint still recorded) if the disk already has that tag id.
        """
        with self.transaction() as conn:
            cur = conn.execute(
                # Only a repeated tag id is ignored (OR IGNORE would also hide CHECKs).
                "INSERT INTO points (disk_id, tag_id, seq, lsn, time_ns, kind, usable)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (disk_id, tag_id) DO NOTHING",
                (point.disk_id, point.tag_id, point.seq, point.lsn, point.time_ns, point.kind,
                 int(point.usable)),
            )  # fmt: skip
            conn.execute(
                "UPDATE disks SET durable_seq = ?, checkpoint_lsn = ? WHERE disk_id = ?",
                (durable_seq, checkpoint_lsn, point.disk_id),
            )
            return cur.rowcount == 1

    def points(
        self, *, disk_id: str | None = None, machine_id: str | None = None
    ) -> list[PointRow]:
        """Points oldest first (by seq), optionally of one disk or one machine."""
        sql = f"SELECT {_POINT_COLS} FROM points p JOIN disks d ON d.disk_id = p.disk_id"
        clauses: list[str] = []
        args: list[str] = []
        if disk_id is not None:
            clauses.append("p.disk_id = ?")
            args.append(disk_id)
        if machine_id is not None:
            clauses.append("d.machine_id = ?")
            args.append(machine_id)
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        sql += " ORDER BY p.seq, p.disk_id"
        return [_point(r) for r in self._conn().execute(sql, args)]

    def newest_points(self) -> dict[str, tuple[str, int, str, int | None]]:
        """Per machine: (tag id, time_ns, kind) of the newest usable tag every disk of
        the machine has applied, and the time_ns of the newest such app-consistent one."""
        rows = (
            self._conn()
            .execute(
                "SELECT d.machine_id, p.tag_id, MIN(p.time_ns), MIN(p.kind), COUNT(*)"
                " FROM points p JOIN disks d ON d.disk_id = p.disk_id WHERE p.usable = 1"
                " GROUP BY d.machine_id, p.tag_id"
                " HAVING COUNT(*) ="
                " (SELECT COUNT(*) FROM disks x WHERE x.machine_id = d.machine_id)"
            )
            .fetchall()
        )
        newest: dict[str, tuple[str, int, str, int | None]] = {}
        for machine, tag_id, time_ns, kind, _ in rows:
            best = newest.get(machine)
            app = best[3] if best else None
            if kind == "app" and (app is None or time_ns > app):
                app = time_ns
            if best is None or time_ns > best[1]:
                newest[machine] = (tag_id, time_ns, kind, app)
            else:
                newest[machine] = (*best[:3], app)
        return newest

    def point(self, disk_id: str, tag_id: str) -> PointRow | None:
        row = (
            self._conn()
            .execute(
                f"SELECT {_POINT_COLS} FROM points p WHERE p.disk_id = ? AND p.tag_id = ?",
                (disk_id, tag_id),
            )
            .fetchone()
        )
        return None if row is None else _point(row)

    def mark_unusable(self, disk_id: str, max_lsn: int) -> int:
        """Points of ``disk_id`` that need the record at ``max_lsn`` become unusable."""
        with self.transaction() as conn:
            cur = conn.execute(
                "UPDATE points SET usable = 0 WHERE disk_id = ? AND lsn <= ? AND usable = 1",
                (disk_id, max_lsn),
            )
            return cur.rowcount

    def rollback_to(self, disk_id: str, seq: int, lsn: int) -> int:
        """Forget the points after ``seq`` and move the checkpoint back to (seq, lsn)."""
        with self.transaction() as conn:
            cur = conn.execute("DELETE FROM points WHERE disk_id = ? AND seq > ?", (disk_id, seq))
            conn.execute(
                "UPDATE disks SET durable_seq = ?, checkpoint_lsn = ? WHERE disk_id = ?",
                (seq, lsn, disk_id),
            )
            return cur.rowcount

    def delete_points_before(self, disk_id: str, lsn: int) -> int:
        """Drop the points that need records before ``lsn``; returns how many."""
        with self.transaction() as conn:
            cur = conn.execute("DELETE FROM points WHERE disk_id = ? AND lsn < ?", (disk_id, lsn))
            return cur.rowcount

    def delete_points_older(self, disk_id: str, time_ns: int) -> int:
        """Drop the points of ``disk_id`` taken before ``time_ns``; returns how many."""
        with self.transaction() as conn:
            cur = conn.execute(
                "DELETE FROM points WHERE disk_id = ? AND time_ns < ?", (disk_id, time_ns)
            )
            return cur.rowcount
