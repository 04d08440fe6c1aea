"""The inventory against real SQLite files: schema, every method, crashes mid-write."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.config.errors import ConfigServerError, Conflict, InvalidArgument, NotFound
from appliance.config.inventory import Inventory
from appliance.config.migrations import MIGRATIONS, SchemaTooNew, migrate, statements
from appliance.config.model import (
    AlertKind,
    ComponentKind,
    JobKind,
    JobState,
    MachineState,
    ServerRole,
    Severity,
)

T0 = 1_700_000_000.0
SHA1 = ":".join(["ab"] * 20)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "inventory.db"


@pytest.fixture
def inv(db: Path) -> Iterator[Inventory]:
    inventory = Inventory.open(db)
    yield inventory
    inventory.close()


def disk(disk_id: str, size: int = 1 << 30, path: str | None = None) -> dict[str, Any]:
    return {
        "disk_id": disk_id,
        "path": path or f"/dev/{disk_id}",
        "size_bytes": size,
        "sector_size": 512,
    }


def placed(inv: Inventory) -> None:
    """A process server and a master target, as most machine tests need."""
    inv.upsert_server("ms1", ServerRole.TARGET, "10.0.0.2:7443", now=T0)
    inv.upsert_server("ps1", ServerRole.PROCESS, "10.0.0.1:7443", target="ms1", now=T0)


# -- opening, pragmas and migrations -------------------------------------------------


def test_open_creates_wal_database_with_default_policy(inv: Inventory, db: Path) -> None:
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
    assert inv._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert inv._conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert [p["name"] for p in inv.policies()] == ["default"]


def test_reopen_keeps_data_and_does_not_migrate_again(db: Path) -> None:
    with Inventory.open(db) as first:
        first.add_machine("m1", "host1", now=T0)
        first.set_policy("gold", rpo_threshold_s=60)
    with Inventory.open(db) as second:
        assert second.machine("m1")["hostname"] == "host1"
        assert [p["name"] for p in second.policies()] == ["default", "gold"]


def test_newer_schema_is_refused(db: Path) -> None:
    Inventory.open(db).close()
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(SchemaTooNew, match="newer than this software") as info:
        Inventory.open(db)
    assert isinstance(info.value, ConfigServerError)


def test_migrations_apply_in_order_from_any_version(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    try:
        assert migrate(conn, MIGRATIONS) == len(MIGRATIONS)
        extra = (
            *MIGRATIONS,
            "CREATE TABLE extra (x INTEGER) STRICT;\nINSERT INTO extra VALUES (7);",
        )
        assert migrate(conn, extra) == len(MIGRATIONS) + 1
        assert conn.execute("SELECT x FROM extra").fetchone() == (7,)
        assert migrate(conn, extra) == len(MIGRATIONS) + 1  # idempotent
    finally:
        conn.close()


def test_failing_migration_leaves_the_old_version(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    try:
        migrate(conn, MIGRATIONS)
        broken = (*MIGRATIONS, "CREATE TABLE half (x INTEGER);\nNOT SQL AT ALL;")
        with pytest.raises(sqlite3.OperationalError):
            migrate(conn, broken)
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert not conn.in_transaction
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        assert "half" not in tables
    finally:
        conn.close()


def test_statements_split_keeps_triggers_whole() -> None:
    script = """
    CREATE TABLE a (x INTEGER);
    -- a comment
    CREATE TRIGGER t AFTER INSERT ON a BEGIN
        UPDATE a SET x = x + 1;
    END;
    """
    parts = statements(script)
    assert len(parts) == 2
    assert parts[1].endswith("END;")
    with pytest.raises(ValueError, match="incomplete"):
        statements("CREATE TABLE b (x INTEGER)")


def test_transaction_groups_and_rolls_back_nested(inv: Inventory) -> None:
    with inv.transaction():
        inv.add_machine("m1", "h1", now=T0)
        with pytest.raises(Conflict), inv.transaction():
            inv.add_machine("m2", "h2", now=T0)
            inv.add_machine("m1", "again", now=T0)
        inv.add_machine("m3", "h3", now=T0)
    assert [m["name"] for m in inv.machines()] == ["m1", "m3"]
    with pytest.raises(RuntimeError), inv.transaction():
        inv.add_machine("m4", "h4", now=T0)
        raise RuntimeError("boom")
    assert [m["name"] for m in inv.machines()] == ["m1", "m3"]


# -- policies ------------------------------------------------------------------------


def test_policies(inv: Inventory) -> None:
    default = inv.policy("default")
    assert default == {
        "name": "default",
        "rpo_threshold_s": 900.0,
        "crash_interval_s": 5.0,
        "app_interval_s": 3600.0,
        "retention_hours": 24.0,
        "retention_bytes": None,
        "pre_script": None,
        "post_script": None,
    }
    gold = inv.set_policy("gold", rpo_threshold_s=60, retention_bytes=10 << 30)
    assert gold["rpo_threshold_s"] == 60.0 and gold["crash_interval_s"] == 5.0
    gold = inv.set_policy("gold", pre_script="/usr/local/bin/freeze", retention_bytes=None)
    assert gold["rpo_threshold_s"] == 60.0
    assert gold["pre_script"] == "/usr/local/bin/freeze" and gold["retention_bytes"] is None
    assert [p["name"] for p in inv.policies()] == ["default", "gold"]
    with pytest.raises(NotFound, match="'silver'"):
        inv.policy("silver")


@pytest.mark.parametrize(
    "settings",
    [
        {"colour": "blue"},
        {"rpo_threshold_s": 0},
        {"crash_interval_s": -1},
        {"app_interval_s": float("nan")},
        {"retention_hours": True},
        {"retention_bytes": -1},
        {"retention_bytes": 1.5},
        {"pre_script": 3},
    ],
)
def test_set_policy_rejects_bad_settings(inv: Inventory, settings: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument):
        inv.set_policy("gold", **settings)
    assert [p["name"] for p in inv.policies()] == ["default"]


def test_set_policy_rejects_bad_name(inv: Inventory) -> None:
    for bad in ("", "a\nb", "x" * 300):
        with pytest.raises(InvalidArgument):
            inv.set_policy(bad)


# -- sites, vCenters, servers --------------------------------------------------------


def test_sites_and_vcenters(inv: Inventory) -> None:
    assert inv.add_site("dc2", "secondary") == {"name": "dc2", "kind": "secondary"}
    inv.add_site("dc1", "primary")
    assert [s["name"] for s in inv.sites()] == ["dc1", "dc2"]
    with pytest.raises(Conflict):
        inv.add_site("dc1", "primary")
    with pytest.raises(InvalidArgument):
        inv.add_site("dc3", "tertiary")

    vc = inv.add_vcenter("vc2", "dc2", "vc2.example", SHA1)
    assert vc == {"name": "vc2", "site": "dc2", "address": "vc2.example", "thumbprint": SHA1}
    with pytest.raises(Conflict):
        inv.add_vcenter("vc2", "dc2", "vc2.example", None)
    with pytest.raises(NotFound, match="'nowhere'"):
        inv.add_vcenter("vc3", "nowhere", "vc3.example", None)
    with pytest.raises(InvalidArgument):
        inv.add_vcenter("vc3", "dc2", "vc3.example", "not-a-thumbprint")
    sha256 = "cd" * 32
    assert inv.set_vcenter_thumbprint("vc2", sha256)["thumbprint"] == sha256
    assert inv.set_vcenter_thumbprint("vc2", None)["thumbprint"] is None
    with pytest.raises(NotFound, match="'vc9'"):
        inv.set_vcenter_thumbprint("vc9", SHA1)
    assert [v["name"] for v in inv.vcenters()] == ["vc2"]


def test_servers(inv: Inventory) -> None:
    placed(inv)
    ps = inv.server("ps1")
    assert ps["role"] == "process" and ps["target"] == "ms1" and ps["enrolled_at"] == T0
    assert ps["last_seen"] is None and ps["stats"] is None
    # Re-registration refreshes the address but keeps the enrolment time.
    again = inv.upsert_server("ps1", "process", "10.0.0.9:7443", site="dc1", now=T0 + 50)
    assert again["address"] == "10.0.0.9:7443" and again["enrolled_at"] == T0
    assert again["site"] == "dc1" and again["target"] is None
    assert [s["name"] for s in inv.servers()] == ["ms1", "ps1"]
    assert [s["name"] for s in inv.servers(ServerRole.TARGET)] == ["ms1"]
    assert [s["name"] for s in inv.servers("process")] == ["ps1"]
    # A target given as an address (or not enrolled yet) is kept as text.
    assert inv.upsert_server("ps2", "process", "h:1", target="10.0.0.2:7443")["target"]
    assert inv.upsert_server("ps3", "process", "h:1")["enrolled_at"] is None

    inv.record_server_report(
        "ms1", last_seen=T0 + 10, stats={"connections": 3}, capacity_bytes=100, free_bytes=40
    )
    ms = inv.server("ms1")
    assert ms["stats"] == {"connections": 3} and ms["free_bytes"] == 40
    assert ms["last_seen"] == T0 + 10


def test_server_errors(inv: Inventory) -> None:
    placed(inv)
    with pytest.raises(Conflict, match="registered as target"):
        inv.upsert_server("ms1", "process", "10.0.0.2:7443", now=T0)
    with pytest.raises(InvalidArgument, match="only a process server"):
        inv.upsert_server("ms2", "target", "h:1", target="ms1", now=T0)
    for address in ("nohost", "h:0", "h:70000", ":80", "h:x"):
        with pytest.raises(InvalidArgument, match="host:port"):
            inv.upsert_server("s", "process", address, now=T0)
    with pytest.raises(InvalidArgument):
        inv.upsert_server("s", "agent", "h:1", now=T0)
    with pytest.raises(InvalidArgument):
        inv.servers("agent")
    with pytest.raises(NotFound, match="'ghost'"):
        inv.server("ghost")
    with pytest.raises(NotFound, match="'ghost'"):
        inv.record_server_report(
            "ghost", last_seen=T0, stats={}, capacity_bytes=None, free_bytes=None
        )
    with pytest.raises(InvalidArgument):
        inv.record_server_report("ms1", last_seen=T0, stats=[], capacity_bytes=1, free_bytes=1)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        inv.record_server_report(
            "ms1", last_seen=T0, stats={"x": object()}, capacity_bytes=1, free_bytes=1
        )
    with pytest.raises(InvalidArgument):
        inv.record_server_report("ms1", last_seen=T0, stats={}, capacity_bytes=-1, free_bytes=1)


# -- machines --------------------------------------------------------------------------


def test_add_and_read_machine(inv: Inventory) -> None:
    agent = {"version": "1.0", "os": "debian 12", "kernel": "6.1", "tracker": "dm-era"}
    m = inv.add_machine("web1", "web1.example", site="dc1", agent=agent, now=T0)
    assert m["name"] == "web1" and m["hostname"] == "web1.example"
    assert m["policy"] == "default" and m["site"] == "dc1"
    assert m["state"] == MachineState.REGISTERED and m["state_since"] == T0
    assert m["created_at"] == T0 and m["agent"] == agent
    assert m["protection_enabled"] is False and m["replicating"] is False
    assert m["resync_requested"] == 0 and m["resync_done"] == 0
    assert m["process_server"] is None and m["newest_point_time"] is None
    assert inv.machines() == [m]
    with pytest.raises(Conflict, match="'web1'"):
        inv.add_machine("web1", "other", now=T0)
    with pytest.raises(NotFound, match="'gold'"):
        inv.add_machine("web2", "web2", policy="gold", now=T0)
    with pytest.raises(InvalidArgument):
        inv.add_machine("web2", "", now=T0)
    with pytest.raises(InvalidArgument):
        inv.add_machine("web2", "web2", agent="1.0", now=T0)  # type: ignore[arg-type]
    with pytest.raises(NotFound, match="'nope'"):
        inv.machine("nope")


def test_update_machine(inv: Inventory) -> None:
    placed(inv)
    inv.set_policy("gold")
    inv.set_group("db", policy="gold")
    inv.add_machine("m1", "h1", now=T0)
    m = inv.update_machine(
        "m1",
        policy="gold",
        process_server="ps1",
        master_target="ms1",
        group_name="db",
        protection_enabled=True,
        replicating=True,
        resync_requested=2,
        last_seen=T0 + 1,
        newest_point_time=T0 + 2,
        newest_point_tag="tag-000042",
        newest_point_kind="app",
        newest_app_point_time=T0 + 2,
        agent={"version": "1.1"},
    )
    assert m["policy"] == "gold" and m["process_server"] == "ps1"
    assert m["master_target"] == "ms1" and m["group_name"] == "db"
    assert m["protection_enabled"] is True and m["replicating"] is True
    assert m["newest_point_tag"] == "tag-000042" and m["agent"] == {"version": "1.1"}
    assert inv.update_machine("m1") == m  # nothing to change is not an error
    m = inv.update_machine("m1", process_server=None, group_name=None)
    assert m["process_server"] is None and m["group_name"] is None


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"state": "protected"}, InvalidArgument),  # only through set_machine_state
        ({"name": "m2"}, InvalidArgument),  # the key, not a rename
        ({"state_since": 1.0}, InvalidArgument),
        ({"created_at": 1.0}, InvalidArgument),
        ({"protection_enabled": 1}, InvalidArgument),
        ({"newest_point_kind": "snapshot"}, InvalidArgument),
        ({"resync_done": -1}, InvalidArgument),
        ({"policy": "gold"}, NotFound),
        ({"group_name": "nogroup"}, NotFound),
        ({"process_server": "ghost"}, NotFound),
        ({"process_server": "ms1"}, InvalidArgument),  # a target, not a process server
        ({"master_target": "ps1"}, InvalidArgument),
    ],
)
def test_update_machine_refuses(
    inv: Inventory, fields: dict[str, Any], error: type[Exception]
) -> None:
    placed(inv)
    before = inv.add_machine("m1", "h1", now=T0)
    with pytest.raises(error):
        inv.update_machine("m1", **fields)
    assert inv.machine("m1") == before


def test_update_unknown_machine(inv: Inventory) -> None:
    with pytest.raises(NotFound, match="'ghost'"):
        inv.update_machine("ghost", last_seen=T0)
    with pytest.raises(NotFound, match="'ghost'"):
        inv.update_machine("ghost")


def test_update_machines_bulk(inv: Inventory) -> None:
    for i in range(3):
        inv.add_machine(f"m{i}", f"h{i}", now=T0)
    skipped = inv.update_machines_bulk(
        [
            ("m0", {"last_seen": T0 + 5, "replicating": True}),
            ("gone", {"last_seen": T0 + 5}),
            ("m2", {"newest_point_time": T0 + 7, "newest_point_tag": "t7"}),
        ]
    )
    assert skipped == ["gone"]
    assert inv.machine("m0")["replicating"] is True
    assert inv.machine("m2")["newest_point_tag"] == "t7"
    with pytest.raises(InvalidArgument):
        inv.update_machines_bulk([("m1", {"last_seen": T0}), ("m0", {"bogus": 1})])
    assert inv.machine("m1")["last_seen"] is None  # checked before anything was written


def test_set_machine_state(inv: Inventory) -> None:
    inv.add_machine("m1", "h1", now=T0)
    assert inv.set_machine_state("m1", MachineState.INITIAL_SYNC, T0 + 10) is True
    assert inv.set_machine_state("m1", "initial-sync", T0 + 20) is False
    m = inv.machine("m1")
    assert m["state"] == "initial-sync" and m["state_since"] == T0 + 10
    with pytest.raises(NotFound, match="'ghost'"):
        inv.set_machine_state("ghost", MachineState.PAUSED, T0)
    with pytest.raises(InvalidArgument):
        inv.set_machine_state("m1", "asleep", T0)


def test_delete_machine_cascades_to_disks(inv: Inventory) -> None:
    inv.add_machine("m1", "h1", now=T0)
    inv.add_machine("m2", "h2", now=T0)
    inv.set_disks("m1", [disk("sda"), disk("sdb")])
    inv.set_disks("m2", [disk("sda")])
    inv.delete_machine("m1")
    assert [(d["machine"], d["disk_id"]) for d in inv.all_disks()] == [("m2", "sda")]
    with pytest.raises(NotFound):
        inv.machine("m1")
    with pytest.raises(NotFound, match="'m1'"):
        inv.delete_machine("m1")


def test_machine_load_counts_every_server(inv: Inventory) -> None:
    placed(inv)
    inv.upsert_server("ps2", "process", "10.0.0.3:7443", now=T0)
    for i in range(3):
        inv.add_machine(f"m{i}", f"h{i}", now=T0)
    inv.update_machine("m0", process_server="ps1", master_target="ms1")
    inv.update_machine("m1", process_server="ps1", master_target="ms1")
    inv.update_machine("m2", process_server="ps2")
    assert inv.machine_load() == {"ms1": 2, "ps1": 2, "ps2": 1}


def test_counts(inv: Inventory) -> None:
    for i in range(4):
        inv.add_machine(f"m{i}", f"h{i}", now=T0)
    inv.set_machine_state("m0", MachineState.PROTECTED, T0)
    inv.set_machine_state("m1", MachineState.PROTECTED, T0)
    inv.set_machine_state("m2", MachineState.RPO_EXCEEDED, T0)
    counts = inv.counts()
    assert counts["machines"] == 4 and counts["protected"] == 2
    assert counts["by_state"]["registered"] == 1
    assert counts["by_state"]["rpo-exceeded"] == 1
    assert set(counts["by_state"]) == {s.value for s in MachineState}


# -- disks -----------------------------------------------------------------------------


def test_set_disks_keeps_progress_of_disks_that_stay(inv: Inventory) -> None:
    inv.add_machine("m1", "h1", now=T0)
    rows = inv.set_disks("m1", [disk("sda"), disk("sdb")])
    assert [d["disk_id"] for d in rows] == ["sda", "sdb"]
    assert rows[0]["initial_done"] is False and rows[0]["resync_required"] is False
    inv.update_disk("m1", "sda", initial_percent=100.0, initial_done=True, backlog_bytes=5)
    rows = inv.set_disks("m1", [disk("sda", path="/dev/vda"), disk("sdc")])
    sda, sdc = rows
    assert sda["path"] == "/dev/vda" and sda["initial_done"] is True
    assert sda["initial_percent"] == 100.0 and sda["backlog_bytes"] == 5
    assert sdc["disk_id"] == "sdc" and sdc["initial_percent"] == 0.0
    assert inv.set_disks("m1", []) == []
    assert inv.disks("m1") == []


def test_set_disks_refuses(inv: Inventory) -> None:
    inv.add_machine("m1", "h1", now=T0)
    inv.set_disks("m1", [disk("sda")])
    with pytest.raises(NotFound, match="'ghost'"):
        inv.set_disks("ghost", [disk("sda")])
    bad_sets: list[list[dict[str, Any]]] = [
        [disk("sdb"), disk("sdb")],
        [disk("sdb", size=0)],
        [{**disk("sdb"), "model": "QEMU"}],
        [{"disk_id": "sdb", "path": "/dev/sdb"}],
        [{**disk("sdb"), "sector_size": 0}],
    ]
    for bad in bad_sets:
        with pytest.raises(InvalidArgument):
            inv.set_disks("m1", bad)
    assert [d["disk_id"] for d in inv.disks("m1")] == ["sda"]


def test_update_disk(inv: Inventory) -> None:
    inv.add_machine("m1", "h1", now=T0)
    inv.set_disks("m1", [disk("sda")])
    d = inv.update_disk("m1", "sda", rate_in=1e6, rate_out=5e5, resync_required=True)
    assert d["rate_in"] == 1e6 and d["resync_required"] is True
    with pytest.raises(NotFound, match="'sdz'"):
        inv.update_disk("m1", "sdz", rate_in=1.0)
    with pytest.raises(NotFound, match="'ghost'"):
        inv.update_disk("ghost", "sda", rate_in=1.0)
    for fields in ({"initial_percent": 101}, {"backlog_bytes": -1}, {"path": "/x"}):
        with pytest.raises(InvalidArgument):
            inv.update_disk("m1", "sda", **fields)
    with pytest.raises(NotFound):
        inv.disks("ghost")


def test_update_disks_bulk_is_one_transaction(inv: Inventory) -> None:
    for m in ("m1", "m2"):
        inv.add_machine(m, m, now=T0)
        inv.set_disks(m, [disk("sda"), disk("sdb")])
    missing = inv.update_disks_bulk(
        [
            ("m1", "sda", {"backlog_bytes": 10, "rate_in": 1.0}),
            ("m1", "sdb", {"initial_percent": 50.0}),
            ("m2", "sda", {"rate_out": 2.0}),
            ("m2", "gone", {"rate_out": 2.0}),
            ("m2", "sdb", {}),
        ]
    )
    assert missing == [("m2", "gone")]
    by_key = {(d["machine"], d["disk_id"]): d for d in inv.all_disks()}
    assert by_key["m1", "sda"]["backlog_bytes"] == 10
    assert by_key["m1", "sdb"]["initial_percent"] == 50.0
    assert by_key["m2", "sda"]["rate_out"] == 2.0
    # One bad row and nothing of the batch is written.
    with pytest.raises(InvalidArgument):
        inv.update_disks_bulk(
            [("m1", "sda", {"backlog_bytes": 99}), ("m1", "sdb", {"rate_in": -1})]
        )
    assert inv.disks("m1")[0]["backlog_bytes"] == 10


def test_thousand_machines_four_disks_each_listed_in_two_queries(inv: Inventory) -> None:
    with inv.transaction():
        for i in range(1000):
            name = f"m{i:04d}"
            inv.add_machine(name, f"{name}.example", agent={"version": "1"}, now=T0 + i)
            inv.set_disks(name, [disk(f"sd{c}") for c in "abcd"])
    inv.update_disks_bulk(
        [(f"m{i:04d}", "sda", {"backlog_bytes": i, "rate_in": 1.5}) for i in range(1000)]
    )
    statements_run: list[str] = []
    inv._conn.set_trace_callback(statements_run.append)
    try:
        machines = inv.machines()
        disks = inv.all_disks()
    finally:
        inv._conn.set_trace_callback(None)
    assert len(statements_run) == 2  # no N+1
    assert len(machines) == 1000 and len(disks) == 4000
    assert machines[999]["name"] == "m0999" and machines[999]["agent"] == {"version": "1"}
    assert disks[4 * 999]["machine"] == "m0999" and disks[4 * 999]["backlog_bytes"] == 999
    assert {d["disk_id"] for d in disks[:4]} == {"sda", "sdb", "sdc", "sdd"}
    assert inv.counts()["by_state"]["registered"] == 1000


# -- groups and plans ------------------------------------------------------------------


def test_groups_and_plans(inv: Inventory) -> None:
    assert inv.set_group("web") == {"name": "web", "policy": None}
    inv.set_group("web", policy="default")
    assert inv.groups() == [{"name": "web", "policy": "default", "interval_s": 300.0}]
    with pytest.raises(NotFound, match="'gold'"):
        inv.set_group("db", policy="gold")
    spec = {"order": [["db"], ["web"]], "delay_s": 30}
    assert inv.set_plan("dr", spec) == {"name": "dr", "spec": spec}
    assert inv.plans() == [{"name": "dr", "spec": spec}]
    with pytest.raises(NotFound, match="'other'"):
        inv.plan("other")
    with pytest.raises(InvalidArgument):
        inv.set_plan("dr", ["not", "a", "mapping"])  # type: ignore[arg-type]


# -- jobs ------------------------------------------------------------------------------


def test_jobs_lifecycle(inv: Inventory) -> None:
    job = inv.add_job("j1", JobKind.PROTECT, "m1", {"policy": "gold"}, T0)
    assert job["state"] == "queued" and job["params"] == {"policy": "gold"}
    assert job["created_at"] == job["updated_at"] == T0 and job["finished_at"] is None
    assert job["step"] == "" and job["step_index"] == 0 and job["percent"] == 0.0
    inv.add_job("j2", "resync", "m2", {}, T0 + 1)
    assert inv.active_job_for("m1") == job
    assert inv.active_job_for("m3") is None

    running = inv.update_job("j1", state="running", step="place", step_index=1, percent=25.0,
                             updated_at=T0 + 2)  # fmt: skip
    assert running["state"] == "running" and running["step"] == "place"
    assert [j["id"] for j in inv.unfinished_jobs()] == ["j1", "j2"]

    done = inv.update_job(
        "j1", state=JobState.SUCCEEDED, percent=100.0, result={"ok": True},
        updated_at=T0 + 3, finished_at=T0 + 3,
    )  # fmt: skip
    assert done["result"] == {"ok": True} and done["finished_at"] == T0 + 3
    assert inv.active_job_for("m1") is None
    assert [j["id"] for j in inv.jobs(include_finished=False)] == ["j2"]
    assert [j["id"] for j in inv.jobs(include_finished=True)] == ["j1", "j2"]
    # The subject is free again once its job finished.
    inv.add_job("j3", "unprotect", "m1", {}, T0 + 4)


def test_job_errors(inv: Inventory) -> None:
    inv.add_job("j1", "protect", "m1", {}, T0)
    with pytest.raises(Conflict, match="'j1'"):
        inv.add_job("j1", "protect", "m9", {}, T0)
    with pytest.raises(Conflict, match="already has job j1"):
        inv.add_job("j2", "resync", "m1", {}, T0)
    with pytest.raises(InvalidArgument):
        inv.add_job("j2", "explode", "m2", {}, T0)
    with pytest.raises(InvalidArgument):
        inv.add_job("j2", "protect", "m2", {"x": {1, 2}}, T0)
    with pytest.raises(NotFound, match="'j9'"):
        inv.job("j9")
    with pytest.raises(NotFound, match="'j9'"):
        inv.update_job("j9", step="x")
    for fields in ({"state": "exploded"}, {"percent": 120.0}, {"kind": "resync"}, {"id": "j7"}):
        with pytest.raises(InvalidArgument):
            inv.update_job("j1", **fields)
    # Re-queuing a finished job while its subject has another active one.
    inv.update_job("j1", state="failed", error="disk gone", finished_at=T0)
    inv.add_job("j2", "resync", "m1", {}, T0 + 1)
    with pytest.raises(Conflict):
        inv.update_job("j1", state="queued")
    assert inv.job("j1")["error"] == "disk gone"


# -- events and alerts -----------------------------------------------------------------


def test_events_newest_first_and_pruned(inv: Inventory) -> None:
    ids = [inv.add_event(Severity.INFO, "m1", "enrolled", f"event {i}", T0 + i) for i in range(5)]
    assert ids == sorted(ids)
    events = inv.events(3)
    assert [e["message"] for e in events] == ["event 4", "event 3", "event 2"]
    assert events[0] == {
        "id": ids[4], "time": T0 + 4, "severity": "info", "subject": "m1",
        "kind": "enrolled", "message": "event 4",
    }  # fmt: skip
    assert inv.add_event("warning", "", "appliance", "no subject is fine", T0) > ids[-1]
    with pytest.raises(InvalidArgument):
        inv.events(0)
    with pytest.raises(InvalidArgument):
        inv.add_event("loud", "m1", "x", "y", T0)
    assert inv.prune_events(before=T0 + 3) == 4
    assert [e["message"] for e in inv.events(10)] == ["event 4", "event 3"]


def test_alert_raise_clear_cycle_keeps_one_open(inv: Inventory) -> None:
    first = inv.raise_alert("m1", AlertKind.RPO_EXCEEDED, Severity.WARNING, "RPO 20m", T0)
    assert first is not None and first["cleared_at"] is None and first["raised_at"] == T0
    # Still exceeded: no new alert, the open one takes the new message and severity.
    assert inv.raise_alert("m1", "rpo-exceeded", "critical", "RPO 40m", T0 + 60) is None
    [open_alert] = inv.alerts(include_cleared=False)
    assert open_alert["id"] == first["id"] and open_alert["message"] == "RPO 40m"
    assert open_alert["severity"] == "critical" and open_alert["raised_at"] == T0
    # Another kind on the same subject is another alert.
    silent = inv.raise_alert("m1", AlertKind.AGENT_DISCONNECTED, "warning", "silent", T0)
    assert silent is not None
    assert inv.open_alerts_count() == 2

    cleared = inv.clear_alert("m1", AlertKind.RPO_EXCEEDED, T0 + 120)
    assert cleared is not None and cleared["id"] == first["id"]
    assert cleared["cleared_at"] == T0 + 120
    assert inv.clear_alert("m1", AlertKind.RPO_EXCEEDED, T0 + 130) is None
    assert inv.open_alerts_count() == 1

    again = inv.raise_alert("m1", AlertKind.RPO_EXCEEDED, "warning", "RPO 16m", T0 + 200)
    assert again is not None and again["id"] != first["id"]
    assert [a["id"] for a in inv.alerts(include_cleared=True)] == [
        again["id"], silent["id"], first["id"]
    ]  # fmt: skip
    assert inv.open_alerts_count() == 2


def test_alert_uniqueness_is_enforced_by_the_database(inv: Inventory) -> None:
    inv.raise_alert("m1", "capacity-low", "warning", "low", T0)
    with pytest.raises(sqlite3.IntegrityError):
        inv._conn.execute(
            "INSERT INTO alerts (subject, kind, severity, message, raised_at)"
            " VALUES ('m1', 'capacity-low', 'warning', 'dup', 0)"
        )


def test_alert_errors(inv: Inventory) -> None:
    with pytest.raises(InvalidArgument):
        inv.raise_alert("m1", "on-fire", "warning", "x", T0)
    with pytest.raises(InvalidArgument):
        inv.raise_alert("", "rpo-exceeded", "warning", "x", T0)
    with pytest.raises(InvalidArgument):
        inv.clear_alert("m1", "on-fire", T0)


# -- certificates and the CSR replay check ---------------------------------------------


def test_certificates_and_revocation(inv: Inventory) -> None:
    cert = inv.add_certificate("0A1B", "web1", ComponentKind.AGENT, T0, T0 + 86400)
    assert cert == {
        "serial": "a1b", "name": "web1", "kind": "agent", "issued_at": T0,
        "expires_at": T0 + 86400, "revoked_at": None,
    }  # fmt: skip
    assert inv.certificate("A1B") == cert
    inv.add_certificate("ff01", "web1", "agent", T0 + 10, T0 + 86400)
    inv.add_certificate("ff02", "ps1", "process", T0, T0 + 86400)
    assert inv.is_revoked("a1b") is False
    assert inv.revoke("web1", T0 + 100) == ["a1b", "ff01"]
    assert inv.revoke("web1", T0 + 200) == []  # nothing new to revoke
    assert inv.certificate("a1b")["revoked_at"] == T0 + 100
    assert inv.revoked_serials() == ["a1b", "ff01"]
    assert inv.is_revoked("A1B") and not inv.is_revoked("ff02")
    assert not inv.is_revoked("123")  # unknown: not revoked; certificate() says unknown


def test_certificate_errors(inv: Inventory) -> None:
    inv.add_certificate("01", "web1", "agent", T0, T0 + 1)
    with pytest.raises(Conflict):
        inv.add_certificate("1", "web2", "agent", T0, T0 + 1)
    with pytest.raises(InvalidArgument):
        inv.add_certificate("xyz", "web2", "agent", T0, T0 + 1)
    with pytest.raises(InvalidArgument):
        inv.add_certificate("02", "web2", "robot", T0, T0 + 1)
    with pytest.raises(InvalidArgument, match="expires before"):
        inv.add_certificate("02", "web2", "agent", T0, T0)
    with pytest.raises(NotFound, match="03"):
        inv.certificate("03")
    with pytest.raises(NotFound, match="'nobody'"):
        inv.revoke("nobody", T0)


def test_remember_csr_refuses_a_replay(inv: Inventory, db: Path) -> None:
    assert inv.remember_csr("aa" * 32, "web1", T0) is True
    assert inv.remember_csr("aa" * 32, "web1", T0 + 1) is False
    assert inv.remember_csr("aa" * 32, "attacker", T0 + 2) is False
    assert inv.remember_csr("bb" * 32, "web2", T0 + 3) is True
    inv.close()
    with Inventory.open(db) as reopened:  # the memory survives a restart
        assert reopened.remember_csr("aa" * 32, "web1", T0 + 4) is False


# -- crash safety ----------------------------------------------------------------------

_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from appliance.config.inventory import Inventory

    inv = Inventory.open(Path(sys.argv[1]))
    stop_inside = int(sys.argv[2])
    for i in range(100_000):
        with inv.transaction():
            name = f"m{i:05d}"
            inv.add_machine(name, name, now=float(i))
            inv.set_disks(name, [
                {"disk_id": f"d{k}", "path": f"/dev/d{k}", "size_bytes": 4096,
                 "sector_size": 512} for k in range(4)
            ])
            inv.add_event("info", name, "enrolled", "x" * 2000, float(i))
            if i == stop_inside:
                print("inside", flush=True)
                time.sleep(60)
        print(i, flush=True)
    """
)


@pytest.mark.parametrize("stop_inside", [-1, 25], ids=["free-running", "mid-transaction"])
def test_sigkill_mid_write_loses_only_the_open_transaction(db: Path, stop_inside: int) -> None:
    Inventory.open(db).close()
    child = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(db), str(stop_inside)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert child.stdout is not None
    committed = -1
    try:
        for line in child.stdout:
            if line.strip() == "inside":
                break
            committed = int(line)
            if stop_inside < 0 and committed >= 40:
                break
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        rest = child.communicate(timeout=30)[0]
    # Commits reported between our last read and the kill are durable too.
    for line in rest.split():
        if line != "inside":
            committed = max(committed, int(line))
    assert committed >= 24

    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    finally:
        conn.close()
    with Inventory.open(db) as inv:
        names = [m["name"] for m in inv.machines()]
        # Every reported commit is there; at most one more (committed, not yet printed).
        assert names[: committed + 1] == [f"m{i:05d}" for i in range(committed + 1)]
        assert len(names) <= committed + 2
        if stop_inside >= 0:
            assert len(names) == stop_inside
        # Transactions are whole: every machine has its four disks and its event.
        disks = inv.all_disks()
        assert len(disks) == 4 * len(names)
        assert len(inv.events(100_000)) == len(names)
        inv.add_machine("after", "after", now=0.0)  # and the database is writable
