"""The failover jobs against vcsim and a real secondsite-targetd.

The master target's datastore directory *is* vcsim's LocalDS_0 (found through
discovery), so the VMDKs it materialises are files vcsim's VMs can attach. The test
streams a replica to the target itself (OpenDisk/Data/Tag, as an agent's process
server would) and keeps the bytes it sent, so every point's image is known exactly.
Jobs run in a real JobEngine on a real Inventory, with the target reached through
TargetClient and vCenter through VCenterStore. The target's `discard` RPC
is the real one; the test ops only record what it removed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pyVmomi import vim

from appliance.config import failover
from appliance.config.errors import InvalidArgument
from appliance.config.inventory import Inventory
from appliance.config.jobs import JobEngine
from appliance.config.migrations import MIGRATIONS, migrate
from appliance.config.model import JobKind, JobState, MachineState
from appliance.config.replica import ReplicaSettings, pick_point
from appliance.config.targets import TargetClient
from appliance.config.vcenters import Credentials, VCenterStore
from appliance.vsphere.hardware import Firmware
from appliance.vsphere.inventory import Inventory as VInventory
from appliance.vsphere.inventory import PowerState, discover
from appliance.vsphere.network import PORTGROUP_PREFIX
from appliance.vsphere.session import Session, connect
from appliance.vsphere.tasks import wait_for_task
from appliance.vsphere.vms import find_vms, marker_owner
from appliance.wire.connection import open_connection
from appliance.wire.messages import Ack, Data, Encoding, Hello, OpenDisk, Tag, TagKind
from appliance.wire.tls import client_context
from tests.conftest import TlsMaterial, free_port
from tests.integration.daemons import RoleDaemon, TargetDaemon
from tests.vcsim.fixture import Vcsim
from tests.vsphere.conftest import endpoint_for

MIB = 1 << 20
DISK = 4 * MIB
CHUNK = 64 * 1024


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- unit: point choice, settings, credentials file ----------------------------------

POINTS = [
    {"tag_id": "a", "time_ns": 10 * 10**9, "kind": "app", "disks": ["d"], "usable": True},
    {"tag_id": "b", "time_ns": 20 * 10**9, "kind": "crash", "disks": ["d"], "usable": True},
    {"tag_id": "c", "time_ns": 30 * 10**9, "kind": "crash", "disks": ["d"], "usable": False},
]


def test_pick_point_by_keyword_tag_and_time() -> None:
    assert pick_point(POINTS, "latest", "m")["tag_id"] == "b"  # c is unusable
    assert pick_point(POINTS, "latest-app", "m")["tag_id"] == "a"
    assert pick_point(POINTS, "a", "m")["tag_id"] == "a"
    assert pick_point(POINTS, 25, "m")["tag_id"] == "b"
    assert pick_point(POINTS, "1970-01-01T00:00:15", "m")["tag_id"] == "a"
    assert pick_point(POINTS, "1970-01-01T01:00:15+01:00", "m")["tag_id"] == "a"
    with pytest.raises(InvalidArgument, match="no recovery point 'zz'"):
        pick_point(POINTS, "zz", "m")
    with pytest.raises(InvalidArgument, match="not usable"):
        pick_point(POINTS, "c", "m")
    with pytest.raises(InvalidArgument, match="at or before"):
        pick_point(POINTS, 5, "m")
    with pytest.raises(InvalidArgument, match="no usable app-consistent"):
        pick_point(POINTS[1:], "latest-app", "m")


def settings_for(inv: VInventory, target_dir: Path, **changes: Any) -> dict[str, Any]:
    cluster = inv.clusters[0]
    # One host: vcsim adds a standard port group to the first host of a cluster only
    # (DuplicateName on the others), so a VM on the cluster could not find it.
    host = min((h for h in inv.hosts if h.cluster == cluster.name), key=lambda h: h.moid)
    value: dict[str, Any] = {
        "vcenter": "vc",
        "datacenter": "DC0",
        "datastore": "LocalDS_0",
        "target_dir": str(target_dir),
        "folder": inv.datacenters[0].vm_folder,
        "resource_pool": cluster.resource_pool,
        "host": host.moid,
        "nics": ["eth0"],
        "network_map": {"eth0": "VM Network"},
        "cpus": 2,
        "memory_mib": 2048,
        "firmware": "efi",
        "guest_id": "debian11_64Guest",
    }
    value.update(changes)
    return value


def test_replica_settings_are_checked_when_stored(tmp_path: Path) -> None:
    good = {
        "vcenter": "vc",
        "datastore": "DS",
        "target_dir": "/srv/ds/",
        "folder": "group-v3",
        "host": "host-1",
        "network_map": {"1": "B", "0": "A"},
    }
    parsed = ReplicaSettings.parse(good)
    assert parsed.nics == ("0", "1") and parsed.disk_datastore == "DS"
    assert parsed.datastore_path("/srv/ds/d1/d1.vmdk") == "[DS] d1/d1.vmdk"
    assert parsed.port_group(1, "1", None) == "B"
    assert parsed.vm_name_for("web/01 é") == "web-01"
    with pytest.raises(InvalidArgument, match="not under"):
        parsed.datastore_path("/elsewhere/x.vmdk")
    with Inventory.open(tmp_path / "inv.db") as inv:
        inv.add_machine("m1", "m1", now=1.0)
        inv.update_machine("m1", replica=good)
        assert inv.machine("m1")["replica"] == good
        for bad, needle in [
            ({**good, "cpus": 0}, "cpus"),
            ({**good, "firmware": "coreboot"}, "firmware"),
            ({**good, "colour": "red"}, "unknown key"),
            ({k: v for k, v in good.items() if k != "folder"}, "missing folder"),
            ({**good, "host": None}, "resource_pool, a host"),
        ]:
            with pytest.raises(InvalidArgument, match=needle):
                inv.update_machine("m1", replica=bad)
        assert inv.machine("m1")["replica"] == good


def test_a_version_1_inventory_gains_the_failover_columns(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "inv.db", isolation_level=None)
    migrate(conn, MIGRATIONS[:1])
    conn.execute(
        "INSERT INTO machines (name, hostname, state, state_since, created_at)"
        " VALUES ('old', 'old', 'registered', 1, 1)"
    )
    conn.close()
    with Inventory.open(tmp_path / "inv.db") as inv:
        machine = inv.machine("old")
        assert machine["replica"] is None and machine["failover"] is None
        inv.update_machine("old", failover={"test": {"job": "j"}})
        assert inv.machine("old")["failover"] == {"test": {"job": "j"}}


# -- the site: vcsim, a targetd on its datastore, a replica fed by the test ----------


@dataclass
class Site:
    vcsim: Vcsim
    target: RoleDaemon
    inventory: VInventory
    datastore: Path


@pytest.fixture(scope="module")
def site(
    vcsim: Vcsim, tls: TlsMaterial, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Site]:
    with connect(endpoint_for(vcsim)) as session:
        inv = discover(session)
    url = next(d.url for d in inv.datastores if d.name == "LocalDS_0")
    datastore = Path(url)
    assert datastore.is_dir()
    base = tmp_path_factory.mktemp("failover")
    target = TargetDaemon(
        base / "target",
        free_port(),
        tls,
        extra_config=f'[storage]\ndatastore = "{datastore}"\n[stream]\ncheckpoint_seconds = 0.1\n',
    )
    target.state_dir.mkdir()
    target.start()
    yield Site(vcsim, target, inv, datastore)
    assert target.stop() == 0


@dataclass
class Disk:
    """The bytes streamed to one replica disk, and its image at each tag."""

    disk_id: str
    machine: str
    image: bytearray = field(default_factory=lambda: bytearray(DISK))
    seq: int = 0
    at_tag: dict[str, str] = field(default_factory=dict)  # tag id -> sha256

    async def send(
        self, site: Site, tls: TlsMaterial, writes: int, tag: str | None, kind: TagKind
    ) -> None:
        ctx = client_context(tls.client.cert, tls.client.key, tls.ca.cert)
        conn = await open_connection(
            "127.0.0.1", site.target.port, ctx, server_hostname="localhost"
        )
        rng = random.Random(f"{self.disk_id}{self.seq}")
        try:
            await conn.send(Hello("test", "failover-test"))
            await conn.send(OpenDisk(self.disk_id, self.machine, DISK))
            for _ in range(writes):
                offset = rng.randrange(DISK // CHUNK) * CHUNK
                payload = rng.randbytes(CHUNK)
                self.image[offset : offset + CHUNK] = payload
                self.seq += 1
                await conn.send(Data(self.disk_id, self.seq, offset, CHUNK, Encoding.RAW, payload))
            if tag is not None:
                self.seq += 1
                await conn.send(Tag(self.disk_id, self.seq, tag, kind, time.time_ns()))
                self.at_tag[tag] = sha256(bytes(self.image))
            async with asyncio.timeout(20):
                while True:
                    reply = await conn.recv()
                    if isinstance(reply, Ack) and reply.seq >= self.seq:
                        break
        finally:
            conn.close()


def feed(site: Site, tls: TlsMaterial, machine: str) -> Disk:
    """A replica with points p1 (app) and p2 (crash) that differ, then untagged writes."""
    disk = Disk(f"{machine}-d0", machine)

    async def run() -> None:
        await disk.send(site, tls, 8, f"{machine}-p1", TagKind.APP)
        await disk.send(site, tls, 8, f"{machine}-p2", TagKind.CRASH)
        await disk.send(site, tls, 4, None, TagKind.CRASH)

    asyncio.run(run())
    assert len(set(disk.at_tag.values())) == 2
    return disk


class Ops(failover.ServiceOps):
    """The real ops; what `discard` removed is recorded, `vsphere` can be held."""

    def __init__(self, site: Site, *args: Any) -> None:
        super().__init__(*args)
        self.site = site
        self.discarded: list[str] = []
        self.hold_at: int | None = None  # the n-th vsphere() call blocks, then fails
        self.held = asyncio.Event()
        self.calls = 0

    async def target_call(
        self, address: str, method: str, params: dict[str, Any], *, timeout: float | None = None
    ) -> Any:
        result = await super().target_call(address, method, params, timeout=timeout)
        if method == "discard":
            self.discarded.extend(result["discarded"])
        return result

    def vsphere(self, vcenter: str) -> Session:
        self.calls += 1
        if self.calls == self.hold_at:
            self.loop.call_soon_threadsafe(self.held.set)
            time.sleep(1.0)  # the "server" dies meanwhile; this work never happens
            raise ConnectionError("configuration server stopped")
        return super().vsphere(vcenter)

    loop: asyncio.AbstractEventLoop


@dataclass
class Env:
    site: Site
    inv: Inventory
    vcenters: VCenterStore
    ops: Ops

    def machine(self, name: str, **replica: Any) -> None:
        self.inv.add_machine(name, name, now=time.time())
        settings = settings_for(self.site.inventory, self.site.datastore, **replica)
        self.inv.update_machine(
            name, master_target="mt1", replica=settings, protection_enabled=True
        )

    async def run(self, kind: JobKind, machine: str, params: dict[str, Any]) -> dict[str, Any]:
        engine = self.engine()
        job_id = engine.submit(kind, machine, params)
        try:
            return await finished(self.inv, job_id)
        finally:
            await engine.close()

    def engine(self) -> JobEngine:
        self.ops.loop = asyncio.get_running_loop()
        defs = failover.definitions(self.ops)
        return JobEngine(self.inv, defs, lambda signal: None, time.time, poll=0.05)


async def finished(inv: Inventory, job_id: str, timeout: float = 60) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while (job := inv.job(job_id))["finished_at"] is None:
            await asyncio.sleep(0.05)
    return job


async def resumed(engine: JobEngine, inv: Inventory, job_id: str) -> tuple[int, dict[str, Any]]:
    """A restarted server: `engine` resumes the unfinished jobs. How many it resumed, and
    `job_id` once it has finished; the engine is closed after."""
    count = engine.resume()
    try:
        return count, await finished(inv, job_id)
    finally:
        await engine.close()


@pytest.fixture
def env(site: Site, tls: TlsMaterial, tmp_path: Path) -> Iterator[Env]:
    inv = Inventory.open(tmp_path / "inv.db")
    inv.add_site("dr", "secondary")
    inv.upsert_server("mt1", "target", f"127.0.0.1:{site.target.port}")
    vcenters = VCenterStore(inv, tmp_path / "state" / "vcenters.json", timeout=10)
    sim = site.vcsim
    vcenters.register(
        "vc", "dr", f"{sim.host}:{sim.port}", Credentials(sim.user, sim.password), sim.cert_sha256
    )
    client = TargetClient(tls.client.cert, tls.client.key, tls.ca.cert, name="configd-test")
    ops = Ops(site, client.call, vcenters, lambda machine: False)
    yield Env(site, inv, vcenters, ops)
    inv.close()


def session_for(site: Site) -> Session:
    return connect(endpoint_for(site.vcsim))


def snapshot(site: Site) -> tuple[dict[str, Any], set[str]]:
    """vcsim's inventory (less datastore free space, which is the host's) and the files."""
    with session_for(site) as session:
        record = discover(session).record()
    for ds in record["datastores"]:
        ds.pop("free")
    return record, {str(p.relative_to(site.datastore)) for p in site.datastore.rglob("*")}


def flat_of(site: Site, datastore_path: str) -> Path:
    rel = datastore_path.split("] ", 1)[1]
    descriptor = site.datastore / rel
    return descriptor.with_name(descriptor.stem + "-flat.vmdk")


# -- integration ---------------------------------------------------------------------


@pytest.mark.integration
def test_credentials_file_is_private_and_holds_no_secret_in_the_db(env: Env) -> None:
    path = env.vcenters.secrets
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert json.loads(path.read_text())["vcenters"]["vc"]["user"] == env.site.vcsim.user
    row = env.inv.vcenters()[0]
    assert row["thumbprint"] == env.site.vcsim.cert_sha256
    assert env.site.vcsim.password not in json.dumps(row)
    assert env.site.vcsim.password not in (env.inv.path.read_bytes().decode("latin-1"))
    assert env.vcenters.probe(f"{env.site.vcsim.host}:{env.site.vcsim.port}") == row["thumbprint"]
    os.chmod(path, 0o644)
    with pytest.raises(Exception, match="readable by others"):
        env.vcenters.endpoint("vc")
    os.chmod(path, 0o600)


@pytest.mark.integration
def test_test_failover_to_an_older_point_then_cleanup(env: Env, tls: TlsMaterial) -> None:
    site = env.site
    disk = feed(site, tls, "web01")
    env.machine("web01")
    before = snapshot(site)

    started = time.monotonic()
    job = asyncio.run(env.run(JobKind.TEST_FAILOVER, "web01", {"point": "web01-p1"}))
    took = time.monotonic() - started
    assert job["state"] == JobState.SUCCEEDED, job["error"]
    result = job["result"]
    assert result["point"]["tag"] == "web01-p1"

    with session_for(site) as session:
        vm = discover(session).vm("web01-test")
    assert vm.power_state is PowerState.ON
    assert (vm.cpus, vm.memory_mib, vm.firmware, vm.guest_id) == (
        2,
        2048,
        Firmware.EFI,
        "debian11_64Guest",
    )
    assert marker_owner(vm.annotation) == job["id"]
    assert [n.network for n in vm.nics] == [f"{PORTGROUP_PREFIX}{job['id']}"]
    assert [d.file_name for d in vm.disks] == [f"[LocalDS_0] web01-d0-{job['id']}.vmdk"]
    flat = flat_of(site, vm.disks[0].file_name)
    assert sha256(flat.read_bytes()) == disk.at_tag["web01-p1"]  # not p2, not the replica
    assert env.inv.machine("web01")["failover"] == {"test": {"job": job["id"]}}
    assert env.inv.machine("web01")["protection_enabled"]  # replication keeps running
    print(f"test failover: {took:.2f} s")

    cleanup = asyncio.run(env.run(JobKind.CLEANUP, "web01", {}))
    assert cleanup["state"] == JobState.SUCCEEDED, cleanup["error"]
    assert sorted(env.ops.discarded) == sorted([flat.name, flat.name.replace("-flat", "")])
    assert snapshot(site) == before
    assert env.inv.machine("web01")["failover"] is None
    again = asyncio.run(env.run(JobKind.CLEANUP, "web01", {}))
    assert again["state"] == JobState.FAILED
    assert "no test failover" in again["error"]


@pytest.mark.integration
def test_a_restart_mid_job_creates_nothing_twice(env: Env, tls: TlsMaterial) -> None:
    site = env.site
    disk = feed(site, tls, "db01")
    env.machine("db01")
    before = snapshot(site)

    async def run() -> dict[str, Any]:
        # The 4th vCenter session is the power-on step's: hold it, stop the "server".
        env.ops.hold_at = 4
        first = env.engine()
        job_id = first.submit(JobKind.TEST_FAILOVER, "db01", {"point": "latest"})
        await asyncio.wait_for(env.ops.held.wait(), 60)
        await first.close()
        job = env.inv.job(job_id)
        assert job["state"] == JobState.RUNNING and job["step"] == "power-on"
        # As if the server had died inside materialize, before recording anything after
        # it: the copy, the port group and the VM exist, the job knows none of them.
        env.inv.update_job(job_id, step_index=1)
        result = {k: v for k, v in job["result"].items() if k in ("point", "vm", "owner", "copy")}
        env.inv.update_job(job_id, result=result)
        count, job = await resumed(env.engine(), env.inv, job_id)
        assert count == 1
        return job

    job = asyncio.run(run())
    assert job["state"] == JobState.SUCCEEDED, job["error"]
    with session_for(site) as session:
        assert len(find_vms(session, "db01-test")) == 1
        inv = discover(session)
        vm = inv.vm("db01-test")
    isolated = [n for n in inv.networks if n.name.startswith(PORTGROUP_PREFIX)]
    assert [n.name for n in isolated] == [f"{PORTGROUP_PREFIX}{job['id']}"]
    assert vm.power_state is PowerState.ON
    assert sha256(flat_of(site, vm.disks[0].file_name).read_bytes()) == disk.at_tag["db01-p2"]
    copies = list(site.datastore.glob(f"db01-d0-{job['id']}*"))
    assert len(copies) == 2  # one descriptor, one flat file
    assert asyncio.run(env.run(JobKind.CLEANUP, "db01", {}))["state"] == JobState.SUCCEEDED
    assert snapshot(site) == before


def nothing_created(env: Env, machine: str, before: tuple[dict[str, Any], set[str]]) -> None:
    assert snapshot(env.site) == before
    assert env.inv.machine(machine)["failover"] is None


@pytest.mark.integration
def test_unknown_point_is_a_clear_error(env: Env, tls: TlsMaterial) -> None:
    feed(env.site, tls, "app01")
    env.machine("app01")
    before = snapshot(env.site)
    job = asyncio.run(env.run(JobKind.TEST_FAILOVER, "app01", {"point": "no-such-tag"}))
    assert job["state"] == JobState.FAILED and job["step"] == "check"
    assert job["error"].startswith("app01 has no recovery point 'no-such-tag'")
    assert "secondsitectl points app01" in job["error"]
    nothing_created(env, "app01", before)


@pytest.mark.integration
def test_wrong_credentials_are_a_clear_error(env: Env, tls: TlsMaterial) -> None:
    feed(env.site, tls, "app02")
    sim = env.site.vcsim
    env.vcenters.register(
        "vc-wrong",
        "dr",
        f"{sim.host}:{sim.port}",
        Credentials(sim.user, "not-the-password"),
        sim.cert_sha256,
        verify=False,
    )
    env.machine("app02", vcenter="vc-wrong")
    before = snapshot(env.site)
    job = asyncio.run(env.run(JobKind.TEST_FAILOVER, "app02", {}))
    assert job["state"] == JobState.FAILED and job["step"] == "check"
    assert "vCenter vc-wrong" in job["error"] and "password refused" in job["error"]
    assert "not-the-password" not in job["error"]
    nothing_created(env, "app02", before)


@pytest.mark.integration
def test_a_vm_name_held_by_a_foreign_vm_is_a_clear_error(env: Env, tls: TlsMaterial) -> None:
    feed(env.site, tls, "app03")
    env.machine("app03")
    with session_for(env.site) as session:
        foreign = next(v for v in session.objects(vim.VirtualMachine) if v.name == "DC0_H0_VM0")
        wait_for_task(foreign.Rename_Task("app03-test"))
    try:
        before = snapshot(env.site)
        job = asyncio.run(env.run(JobKind.TEST_FAILOVER, "app03", {}))
        assert job["state"] == JobState.FAILED and job["step"] == "check"
        assert "a VM called 'app03-test' exists and is not Secondsite's" in job["error"]
        nothing_created(env, "app03", before)
    finally:
        with session_for(env.site) as session:
            foreign = next(v for v in session.objects(vim.VirtualMachine) if v.name == "app03-test")
            wait_for_task(foreign.Rename_Task("DC0_H0_VM0"))


@pytest.mark.integration
def test_a_failure_after_materialize_removes_what_was_made(env: Env, tls: TlsMaterial) -> None:
    feed(env.site, tls, "app04")
    env.machine("app04")
    before = snapshot(env.site)
    params = {"network_map": {"eth0": "no-such-portgroup"}}
    job = asyncio.run(env.run(JobKind.TEST_FAILOVER, "app04", params))
    assert job["state"] == JobState.FAILED and job["step"] == "vm"
    assert "port group 'no-such-portgroup' not found" in job["error"]
    assert len(env.ops.discarded) == 2  # the copy was made, then discarded
    nothing_created(env, "app04", before)


@pytest.mark.integration
def test_failover_cancel_then_failover_commit(env: Env, tls: TlsMaterial) -> None:
    site = env.site
    disk = feed(site, tls, "erp01")
    env.machine("erp01", vm_name="erp01-dr")
    replica_flat = site.datastore / "erp01-d0" / "erp01-d0-flat.vmdk"
    assert sha256(replica_flat.read_bytes()) == sha256(bytes(disk.image))  # untagged tail

    job = asyncio.run(env.run(JobKind.FAILOVER, "erp01", {"point": "latest", "mode": "planned"}))
    assert job["state"] == JobState.SUCCEEDED, job["error"]
    machine = env.inv.machine("erp01")
    assert not machine["protection_enabled"] and machine["state"] == MachineState.FAILED_OVER
    assert machine["failover"]["failover"]["state"] == "failed-over"
    # Rolled back to p2: the writes after the last tag are gone from the replica itself.
    assert sha256(replica_flat.read_bytes()) == disk.at_tag["erp01-p2"]
    with session_for(site) as session:
        vm = discover(session).vm("erp01-dr")
    assert vm.power_state is PowerState.ON
    assert [d.file_name for d in vm.disks] == ["[LocalDS_0] erp01-d0/erp01-d0.vmdk"]
    assert [n.network for n in vm.nics] == ["VM Network"]

    cancel = asyncio.run(env.run(JobKind.CANCEL, "erp01", {}))
    assert cancel["state"] == JobState.SUCCEEDED, cancel["error"]
    machine = env.inv.machine("erp01")
    assert machine["protection_enabled"] and machine["failover"] is None
    assert machine["resync_requested"] == 1  # the replica must be compared again
    with session_for(site) as session:
        assert find_vms(session, "erp01-dr") == []
    assert sha256(replica_flat.read_bytes()) == disk.at_tag["erp01-p2"]  # disks survive

    job = asyncio.run(env.run(JobKind.FAILOVER, "erp01", {"point": "erp01-p1"}))
    assert job["state"] == JobState.SUCCEEDED, job["error"]
    assert sha256(replica_flat.read_bytes()) == disk.at_tag["erp01-p1"]
    commit = asyncio.run(env.run(JobKind.COMMIT, "erp01", {}))
    assert commit["state"] == JobState.SUCCEEDED, commit["error"]
    machine = env.inv.machine("erp01")
    assert machine["state"] == MachineState.FAILOVER_COMMITTED
    assert machine["failover"]["failover"]["state"] == "committed"
    refused = asyncio.run(env.run(JobKind.CANCEL, "erp01", {}))
    assert refused["state"] == JobState.FAILED and "committed" in refused["error"]
    again = asyncio.run(env.run(JobKind.FAILOVER, "erp01", {}))
    assert again["state"] == JobState.FAILED and "already" in again["error"]
    with session_for(site) as session:
        assert len(find_vms(session, "erp01-dr")) == 1
