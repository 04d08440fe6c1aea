"""Replica VMs on vcsim: attach pre-written flat VMDKs, power, idempotence, ownership."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from pyVmomi import vim, vmodl

from appliance.target import vmdk
from appliance.vsphere.errors import (
    BadCredentials,
    DatastoreFull,
    NameTaken,
    NotFound,
    NotOurs,
    TaskFailed,
    Unreachable,
    VSphereError,
)
from appliance.vsphere.hardware import ControllerType, Firmware
from appliance.vsphere.inventory import Inventory, PowerState, discover
from appliance.vsphere.network import ensure_isolated_portgroup, remove_isolated_portgroup
from appliance.vsphere.session import Session
from appliance.vsphere.tasks import translate, wait_for_task
from appliance.vsphere.vms import (
    VmSpec,
    destroy_vm,
    ensure_vm,
    find_vms,
    marker_owner,
    power_off,
    power_on,
)
from tests.vcsim.fixture import Vcsim

pytestmark = [pytest.mark.integration]

MIB = 1 << 20


def replica(vcsim: Vcsim, disk_id: str, size: int = 16 * MIB) -> tuple[str, Path]:
    """A master-target-style replica pair on LocalDS_0: (datastore path, flat file)."""
    pair = vmdk.create_replica(vcsim.datastore_dir(), disk_id, size)
    with pair.flat.open("r+b") as f:
        f.write(b"recovery point " + disk_id.encode())
    return f"[LocalDS_0] {disk_id}/{disk_id}.vmdk", pair.flat


def spec_for(inv: Inventory, name: str, owner: str, **changes: object) -> VmSpec:
    cluster = inv.clusters[0]
    fields: dict[str, object] = {
        "name": name,
        "owner": owner,
        "datastore": "LocalDS_0",
        "folder": inv.datacenters[0].vm_folder,
        "resource_pool": cluster.resource_pool,
    }
    fields.update(changes)
    return VmSpec(**fields)  # type: ignore[arg-type]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_replica_vm_lifecycle(vcsim: Vcsim, session: Session) -> None:
    inv = discover(session)
    boot, boot_flat = replica(vcsim, "web01-disk0")
    data, data_flat = replica(vcsim, "web01-disk1", 32 * MIB)
    digests = (sha256(boot_flat), sha256(data_flat))
    spec = spec_for(
        inv,
        "web01",
        "machine-web01",
        cpus=2,
        memory_mib=2048,
        firmware=Firmware.EFI,
        guest_id="debian11_64Guest",
        disks=(boot, data),
        nics=("VM Network", "DC0_DVPG0"),
    )
    vm = ensure_vm(session, spec)
    again = ensure_vm(session, spec)
    assert again._moId == vm._moId
    assert len(find_vms(session, "web01")) == 1

    power_on(vm)
    power_on(vm)  # already on: nothing to do
    got = discover(session).vm("web01")
    assert got.power_state is PowerState.ON
    assert (got.cpus, got.memory_mib, got.firmware) == (2, 2048, Firmware.EFI)
    assert got.guest_id == "debian11_64Guest"
    assert [d.file_name for d in got.disks] == [boot, data]
    assert [(d.controller, d.bus, d.unit) for d in got.disks] == [
        (ControllerType.PVSCSI, 0, 0),
        (ControllerType.PVSCSI, 0, 1),
    ]
    assert [(n.network, n.adapter) for n in got.nics] == [
        ("VM Network", "vmxnet3"),
        ("DC0_DVPG0", "vmxnet3"),
    ]
    assert marker_owner(got.annotation) == "machine-web01"
    assert got.vmx_path == "[LocalDS_0] web01/web01.vmx"
    backings = [
        d.backing for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)
    ]
    assert all(isinstance(b, vim.vm.device.VirtualDisk.FlatVer2BackingInfo) for b in backings)

    power_off(vm)
    assert vm.runtime.powerState == vim.VirtualMachine.PowerState.poweredOff
    power_on(vm)  # destroy powers off itself
    assert destroy_vm(session, "web01", "machine-web01")
    assert not destroy_vm(session, "web01", "machine-web01")  # gone: a no-op
    assert find_vms(session, "web01") == []
    assert not (vcsim.datastore_dir() / "web01").exists()
    # The replica disks are the master target's: untouched, still there.
    assert (sha256(boot_flat), sha256(data_flat)) == digests
    assert (boot_flat.parent / "web01-disk0.vmdk").is_file()


def test_foreign_vm_name_is_taken_and_not_destroyed(session: Session) -> None:
    inv = discover(session)
    foreign = "DC0_H0_VM0"  # one of vcsim's own VMs, no marker
    with pytest.raises(NameTaken):
        ensure_vm(session, spec_for(inv, foreign, "machine-x"))
    with pytest.raises(NotOurs):
        destroy_vm(session, foreign, "machine-x")
    assert len(find_vms(session, foreign)) == 1


def test_another_owners_vm_is_not_ours(vcsim: Vcsim, session: Session) -> None:
    inv = discover(session)
    disk, _ = replica(vcsim, "db01-disk0")
    vm = ensure_vm(session, spec_for(inv, "db01", "machine-a", disks=(disk,)))
    try:
        with pytest.raises(NameTaken):
            ensure_vm(session, spec_for(inv, "db01", "machine-b", disks=(disk,)))
        with pytest.raises(NotOurs):
            destroy_vm(session, "db01", "machine-b")
    finally:
        assert destroy_vm(session, "db01", "machine-a")
    assert vm is not None


def test_vm_on_a_host_with_lsilogic_on_the_isolated_network(vcsim: Vcsim, session: Session) -> None:
    inv = discover(session)
    host = next(h for h in inv.hosts if h.name == "DC0_H0")
    network = ensure_isolated_portgroup(session, host.moid, "drill-app01")
    disk, _ = replica(vcsim, "app01-disk0")
    spec = spec_for(
        inv,
        "app01",
        "job-7",
        resource_pool=None,
        host=host.moid,
        controller=ControllerType.LSILOGIC,
        disks=(disk,),
        nics=(network.portgroup,),
    )
    vm = ensure_vm(session, spec)
    power_on(vm)
    got = discover(session).vm("app01")
    assert got.host == "DC0_H0"
    assert got.disks[0].controller is ControllerType.LSILOGIC
    assert [n.network for n in got.nics] == [network.portgroup]
    assert destroy_vm(session, "app01", "job-7")
    assert remove_isolated_portgroup(session, host.moid, "drill-app01")


def test_bad_references_are_not_found(session: Session) -> None:
    inv = discover(session)
    with pytest.raises(NotFound, match="datastore"):
        ensure_vm(session, spec_for(inv, "x1", "o", datastore="NoSuchDS"))
    with pytest.raises(NotFound, match="port group"):
        ensure_vm(session, spec_for(inv, "x1", "o", nics=("no-such-network",)))
    with pytest.raises(NotFound):
        ensure_vm(session, spec_for(inv, "x1", "o", folder="group-v404"))
    assert find_vms(session, "x1") == []


def test_spec_validation() -> None:
    base = {"name": "vm", "owner": "o", "datastore": "ds", "folder": "f"}
    with pytest.raises(ValueError, match="pool"):
        VmSpec(**base)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="disk"):
        VmSpec(**base, host="h", disks=("not a path",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="controller"):
        VmSpec(**base, host="h", controller=ControllerType.NVME)  # type: ignore[arg-type]


def test_duplicate_name_task_fault_is_name_taken(session: Session) -> None:
    # vcsim's CreateVM does not check names (ensure_vm does); AddDVPortgroup does.
    dvs = session.objects(vim.DistributedVirtualSwitch)[0]
    spec = vim.dvs.DistributedVirtualPortgroup.ConfigSpec(name="DC0_DVPG0", type="earlyBinding")
    with pytest.raises(NameTaken, match="DuplicateName"):
        wait_for_task(dvs.AddDVPortgroup_Task([spec]), 30, "add port group")


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        (vim.fault.NoDiskSpace(datastore="LocalDS_0"), DatastoreFull),
        (vim.fault.InsufficientStorageSpace(), DatastoreFull),
        (vim.fault.DuplicateName(name="x"), NameTaken),
        (vim.fault.AlreadyExists(name="x"), NameTaken),
        (vim.fault.InvalidLogin(), BadCredentials),
        (vim.fault.FileNotFound(file="[ds] x.vmdk"), NotFound),
        (vmodl.fault.ManagedObjectNotFound(), NotFound),
        (vim.fault.HostConnectFault(), Unreachable),
        (ConnectionResetError(), Unreachable),
        (vim.fault.InvalidState(), TaskFailed),
    ],
)
def test_fault_translation(fault: BaseException, error: type[VSphereError]) -> None:
    # vcsim cannot fill a datastore or drop a host; the mapping itself is checked here.
    translated = translate(fault, "create VM web01")
    assert type(translated) is error
    assert str(translated).startswith("create VM web01: ")


def test_task_failures_carry_the_fault_name(session: Session) -> None:
    vm = next(v for v in session.objects(vim.VirtualMachine) if v.name == "DC0_H0_VM0")
    # Powering on a running VM is an InvalidPowerState fault.
    with pytest.raises(TaskFailed) as info:
        wait_for_task(vm.PowerOnVM_Task(), 30, "power on")
    assert info.value.fault == "InvalidPowerState"
