"""Discovery of vcsim's model inventory, and isolated port groups that leave no trace."""

from __future__ import annotations

import pytest
from pyVmomi import vim

from appliance.vsphere.errors import NameTaken, NotFound
from appliance.vsphere.hardware import ControllerType, Firmware
from appliance.vsphere.inventory import FolderKind, NetworkKind, PowerState, discover
from appliance.vsphere.network import (
    ensure_isolated_portgroup,
    isolated_names,
    remove_isolated_portgroup,
)
from appliance.vsphere.session import Session
from tests.vcsim.fixture import Vcsim

pytestmark = [pytest.mark.integration]


def test_discovery_finds_the_model_inventory(vcsim: Vcsim, session: Session) -> None:
    inv = discover(session)
    assert [dc.name for dc in inv.datacenters] == ["DC0"]
    assert [c.name for c in inv.clusters] == ["DC0_C0"]
    assert inv.clusters[0].hosts == ("DC0_C0_H0", "DC0_C0_H1", "DC0_C0_H2")
    hosts = {h.name: h for h in inv.hosts}
    assert set(hosts) == {"DC0_C0_H0", "DC0_C0_H1", "DC0_C0_H2", "DC0_H0"}
    assert hosts["DC0_H0"].cluster is None
    assert hosts["DC0_C0_H1"].cluster == "DC0_C0"
    assert hosts["DC0_C0_H1"].resource_pool == inv.clusters[0].resource_pool
    assert all(h.datastores == ("LocalDS_0",) for h in hosts.values())
    assert all("VM Network" in h.networks for h in hosts.values())

    [ds] = inv.datastores
    assert (ds.name, ds.datacenter, ds.url) == ("LocalDS_0", "DC0", str(vcsim.datastore_dir()))
    assert 0 < ds.free <= ds.capacity

    networks = {n.name: n for n in inv.networks}
    assert networks["VM Network"].kind is NetworkKind.STANDARD
    assert networks["DC0_DVPG0"].kind is NetworkKind.DISTRIBUTED
    assert networks["DC0_DVPG0"].switch == "DVS0"

    folders = {f.path: f for f in inv.folders}
    assert folders["DC0/vm"].kind is FolderKind.VM
    assert folders["DC0/vm"].moid == inv.datacenters[0].vm_folder
    assert folders["DC0/network"].kind is FolderKind.NETWORK
    assert {p.owner for p in inv.resource_pools} == {"DC0_C0", "DC0_H0"}

    assert {vm.name for vm in inv.vms} == {
        "DC0_H0_VM0",
        "DC0_H0_VM1",
        "DC0_C0_RP0_VM0",
        "DC0_C0_RP0_VM1",
    }


def test_discovery_reads_vm_hardware(session: Session) -> None:
    vm = discover(session).vm("DC0_H0_VM0")
    assert (vm.cpus, vm.memory_mib, vm.firmware) == (1, 32, Firmware.BIOS)
    assert vm.guest_id == "otherGuest"
    assert vm.power_state is PowerState.ON
    assert (vm.datacenter, vm.host) == ("DC0", "DC0_H0")
    [disk] = vm.disks
    assert disk.file_name == "[LocalDS_0] DC0_H0_VM0/disk1.vmdk"
    assert (disk.controller, disk.bus, disk.unit) == (ControllerType.PVSCSI, 0, 0)
    assert disk.capacity == 1 << 20
    [nic] = vm.nics
    assert nic.network == "DC0_DVPG0"
    assert nic.adapter == "e1000"
    assert len(nic.mac.split(":")) == 6
    record = vm.record()
    assert record["firmware"] == "bios"
    assert record["disks"][0]["controller"] == "pvscsi"
    assert isinstance(record["nics"], list)


@pytest.mark.parametrize("target", ["cluster", "host"])
def test_isolated_portgroup_is_idempotent_and_leaves_no_trace(
    session: Session, target: str
) -> None:
    before = discover(session)
    if target == "cluster":
        target_id = before.clusters[0].moid
        expected = before.clusters[0].hosts
    else:
        host = next(h for h in before.hosts if h.name == "DC0_H0")
        target_id, expected = host.moid, (host.name,)
    network_id = f"drill-{target}"
    portgroup, vswitch = isolated_names(network_id)

    first = ensure_isolated_portgroup(session, target_id, network_id)
    second = ensure_isolated_portgroup(session, target_id, network_id)
    assert first == second
    assert first.hosts == expected
    during = discover(session)
    assert [n.name for n in during.networks].count(portgroup) == 1  # one network, all hosts
    for host in session.objects(vim.HostSystem):
        switches = {s.name: s for s in host.configManager.networkSystem.networkInfo.vswitch}
        if host.name in expected:
            assert vswitch in switches
            assert not switches[vswitch].pnic  # no uplink: isolated
        else:
            assert vswitch not in switches

    assert remove_isolated_portgroup(session, target_id, network_id)
    assert not remove_isolated_portgroup(session, target_id, network_id)
    assert discover(session) == before
    for host in session.objects(vim.HostSystem):
        assert vswitch not in {s.name for s in host.configManager.networkSystem.networkInfo.vswitch}


def test_isolated_portgroup_refuses_foreign_names_and_unknown_targets(session: Session) -> None:
    host = next(h for h in session.objects(vim.HostSystem) if h.name == "DC0_C0_H0")
    portgroup, _ = isolated_names("taken")
    # Somebody else's port group of our name, on their own (uplinked) vSwitch0.
    host.configManager.networkSystem.AddPortGroup(
        portgrp=vim.host.PortGroup.Specification(
            name=portgroup, vlanId=0, vswitchName="vSwitch0", policy=vim.host.NetworkPolicy()
        )
    )
    try:
        with pytest.raises(NameTaken):
            ensure_isolated_portgroup(session, host._moId, "taken")
        switches = host.configManager.networkSystem.networkInfo.vswitch
        assert [s.name for s in switches] == ["vSwitch0"]  # nothing half-created
    finally:
        host.configManager.networkSystem.RemovePortGroup(pgName=portgroup)
    with pytest.raises(NotFound):
        ensure_isolated_portgroup(session, "host-404", "x")
    with pytest.raises(ValueError):
        isolated_names("no spaces allowed")
