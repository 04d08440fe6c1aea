"""Protect by VM: a source vCenter's VMs, and one of them tied to its enrolled machine.

A VM is linked to the machine its agent enrolled as by the SMBIOS (BIOS) UUID: the
agent sends /sys/class/dmi/id/product_uuid when it enrols (agent/host_facts.py), the
VM carries it as ``config.uuid``. VMware guests on old virtual hardware read the first
three fields byte-swapped (pre-SMBIOS-2.6 order), so both spellings match.

A VM without an enrolled agent is refused with the remedy (install the agent, then
protect again) rather than stored as pending: the replica settings live with the
machine, and a machine exists only once its agent has enrolled; a pending list would
be a second place to look, with nothing to replicate until the agent is there anyway.

The replica settings are filled from the VM's hardware (CPUs, memory, firmware, guest
id, NIC labels in order) plus the placement and network map given, checked against the
replica vCenter, and stored with the machine (by the caller), with the source VM
recorded under ``source``. Everything here blocks (vSphere calls): run it in a worker thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from pyVmomi import vim

from appliance.config.api import Record
from appliance.config.errors import ConfigServerError, InvalidArgument, NotFound
from appliance.config.failover_base import vsphere_failure
from appliance.config.replica import ReplicaSettings
from appliance.config.vcenters import VCenterStore
from appliance.vsphere.errors import VSphereError
from appliance.vsphere.inventory import Inventory as VInventory
from appliance.vsphere.inventory import VirtualMachine, discover
from appliance.vsphere.session import Session

T = TypeVar("T")

#: Placement keys protect-vm takes (as in replica.py).
PLACEMENT = ("datastore", "disk_datastore", "target_dir", "folder", "resource_pool", "host",
             "cluster", "vm_name", "datacenter")  # fmt: skip


def swapped(uuid: str) -> str:
    """`uuid` with its first three fields byte-swapped (the other SMBIOS spelling)."""
    parts = uuid.split("-")
    if len(parts) != 5:
        return uuid
    for i in range(3):
        parts[i] = "".join(reversed([parts[i][j : j + 2] for j in range(0, len(parts[i]), 2)]))
    return "-".join(parts)


def machine_for(machines: list[Record], bios_uuid: str) -> str | None:
    """The enrolled machine whose agent reported `bios_uuid` (either spelling)."""
    if not bios_uuid:
        return None
    wanted = {bios_uuid.lower(), swapped(bios_uuid.lower())}
    for machine in machines:
        reported = str((machine.get("agent") or {}).get("bios_uuid") or "").lower()
        if reported in wanted:
            return str(machine["name"])
    return None


def vm_record(vm: VirtualMachine, machine: str | None) -> Record:
    return {
        "name": vm.name, "moid": vm.moid, "power_state": str(vm.power_state),
        "host": vm.host or "", "cpus": vm.cpus, "memory_mib": vm.memory_mib,
        "firmware": str(vm.firmware), "guest_id": vm.guest_id, "bios_uuid": vm.bios_uuid,
        "nics": [{"label": n.label, "network": n.network, "mac": n.mac} for n in vm.nics],
        "disks": [{"label": d.label, "file": d.file_name, "capacity": d.capacity or 0}
                  for d in vm.disks],
        "machine": machine or "",
    }  # fmt: skip


def list_vms(store: VCenterStore, machines: list[Record], vcenter: str) -> list[Record]:
    """The VMs (not templates) of `vcenter`, each with the machine (of `machines`, the
    inventory's) it is linked to."""
    vms = _discover(store, vcenter).vms
    return [
        vm_record(vm, machine_for(machines, vm.bios_uuid))
        for vm in sorted(vms, key=lambda v: (v.name, v.moid))
        if not vm.template
    ]


def protect_vm(
    store: VCenterStore,
    machines: list[Record],
    vm_name: str,
    *,
    source: str,
    replica_vcenter: str,
    placement: dict[str, Any],
    network_map: dict[str, str],
) -> Record:
    """Link VM `vm_name` (a name or a moid) of `source` to its machine (of `machines`)
    and make its replica settings: {"machine", "vm", "replica"}, for the caller to store
    (on the event loop: the inventory is not for worker threads)."""
    unknown = sorted(set(placement) - set(PLACEMENT))
    if unknown:
        raise InvalidArgument(f"unknown placement key(s) {', '.join(unknown)}")
    vm = _find_vm(_discover(store, source).vms, vm_name, source)
    machine = machine_for(machines, vm.bios_uuid)
    if machine is None:
        raise NotFound(
            f"no enrolled agent runs in VM {vm.name} (BIOS UUID {vm.bios_uuid or 'unknown'}); "
            f"install the agent first ('secondsitectl push-install' to the VM's address, or "
            "'secondsite-agent enroll' on it), then run protect-vm again"
        )
    settings = replica_settings(vm, source, replica_vcenter, placement, network_map)
    parsed = ReplicaSettings.parse(settings)
    _session_do(store, replica_vcenter, lambda s: check_placement(s, parsed))
    return {"machine": machine, "vm": vm.name, "replica": settings}


def replica_settings(
    vm: VirtualMachine,
    source: str,
    replica_vcenter: str,
    placement: dict[str, Any],
    network_map: dict[str, str],
) -> dict[str, Any]:
    """The settings for `vm`: its hardware, the placement, each NIC's port group.

    A network_map key names a NIC by label ("Network adapter 1"), by index ("0"), or
    by the source port group it is on ("VM Network"), in that order of precedence."""
    labels = [nic.label for nic in vm.nics]
    # The stored map is keyed by label, or by index where labels repeat (vcsim gives
    # every NIC of a new VM the same one); replica.py looks up both.
    unique = len(set(labels)) == len(labels)
    mapped: dict[str, str] = {}
    for index, nic in enumerate(vm.nics):
        for key in (nic.label, str(index), nic.network):
            if key in network_map:
                mapped[nic.label if unique else str(index)] = network_map[key]
                break
        else:
            raise InvalidArgument(
                f"{nic.label} of VM {vm.name} (on {nic.network!r}) has no port group at "
                f"the replica site; map it with --network '{nic.network}=PORTGROUP'"
            )
    used = {n.label for n in vm.nics} | {str(i) for i in range(len(vm.nics))}
    stray = sorted(set(network_map) - used - {n.network for n in vm.nics})
    if stray:
        raise InvalidArgument(f"VM {vm.name} has no NIC or network {', '.join(stray)}")
    return {
        "vcenter": replica_vcenter,
        **{k: v for k, v in placement.items() if v not in (None, "")},
        "nics": labels,
        "network_map": mapped,
        "cpus": vm.cpus,
        "memory_mib": vm.memory_mib,
        "firmware": str(vm.firmware),
        "guest_id": vm.guest_id or "otherLinux64Guest",
        "source": {"vcenter": source, "vm": vm.name, "moid": vm.moid, "bios_uuid": vm.bios_uuid},
    }


def check_placement(session: Session, settings: ReplicaSettings) -> None:
    """The placement names objects the replica vCenter has (raises VSphereError)."""
    session.ref(vim.Folder, settings.folder)
    if settings.resource_pool:
        session.ref(vim.ResourcePool, settings.resource_pool)
    if settings.host:
        session.ref(vim.HostSystem, settings.host)
    if settings.cluster:
        session.ref(vim.ComputeResource, settings.cluster)
    datastores = {ds.name for ds in session.objects(vim.Datastore)}
    networks = {net.name for net in session.objects(vim.Network)}
    for name in {settings.datastore, settings.disk_datastore} - datastores:
        raise ConfigServerError(f"vCenter {settings.vcenter} has no datastore {name!r}")
    for name in sorted(set(settings.network_map.values()) - networks):
        raise ConfigServerError(f"vCenter {settings.vcenter} has no port group {name!r}")


def _find_vm(vms: tuple[VirtualMachine, ...], wanted: str, source: str) -> VirtualMachine:
    found = [vm for vm in vms if wanted in (vm.name, vm.moid) and not vm.template]
    if not found:
        raise NotFound(
            f"no VM {wanted!r} in vCenter {source}; list them with "
            f"'secondsitectl vms --vcenter {source}'"
        )
    if len(found) > 1:
        ids = ", ".join(vm.moid for vm in found)
        raise InvalidArgument(f"{len(found)} VMs are called {wanted!r} in {source}; "
                              f"name one by its id ({ids})")  # fmt: skip
    return found[0]


def _discover(store: VCenterStore, vcenter: str) -> VInventory:
    return _session_do(store, vcenter, discover)


def _session_do(store: VCenterStore, vcenter: str, work: Callable[[Session], T]) -> T:
    try:
        with store.open_session(vcenter) as session:
            return work(session)
    except VSphereError as exc:
        raise ConfigServerError(vsphere_failure(vcenter, "inventory", exc)) from None
