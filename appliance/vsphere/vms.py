"""Replica VMs: create one from a spec on existing disks, power it, destroy it.

Ownership is written into the VM itself: `config.annotation` carries a marker line
``secondsite-owner: <owner>`` (the job or machine id). That makes every step safe to
repeat after a crash: `ensure_vm` finds the VM a previous run created instead of making
a second one, refuses a name held by anybody else (NameTaken), and `destroy_vm` removes
only VMs with our marker. The annotation is used rather than a custom field because it
needs no vCenter-wide field definition (and so no Global.ManageCustomFields privilege).

Destroying a VM deletes its attached disks on vSphere; replica disks belong to the
master target, so `destroy_vm` detaches them first and they survive.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from pyVmomi import vim

from appliance.vsphere.errors import NameTaken, NotFound, NotOurs
from appliance.vsphere.hardware import (
    MAX_SCSI_CONTROLLERS,
    SCSI_UNITS,
    ControllerType,
    Firmware,
    flat_disk,
    scsi_controller,
    vmxnet3,
)
from appliance.vsphere.session import Session
from appliance.vsphere.tasks import DEFAULT_TIMEOUT, translated, wait_for_task

log = logging.getLogger(__name__)

MARKER = "secondsite-owner:"
_ANNOTATION = "Secondsite replica VM. Keep the next line: Secondsite finds its VMs by it.\n"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,79}$")
_OWNER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_DS_PATH_RE = re.compile(r"^\[(?P<ds>[^\]]+)\] (?P<path>[^\s/][^\n]*\.vmdk)$")


def validate_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"VM name {name!r}: 1-80 of A-Z a-z 0-9 space . _ -")
    return name


def marker_owner(annotation: str | None) -> str | None:
    """The owner recorded in a VM's annotation, None if it carries no Secondsite marker."""
    for line in (annotation or "").splitlines():
        if line.startswith(MARKER):
            return line[len(MARKER) :].strip() or None
    return None


def annotation_for(owner: str) -> str:
    return f"{_ANNOTATION}{MARKER} {owner}\n"


@dataclass(frozen=True)
class VmSpec:
    """A replica VM to create. References are managed object ids from discovery.

    `disks` are existing monolithicFlat descriptors as datastore paths
    ("[ds] dir/name.vmdk"), attached in order on `controller` controllers; `nics` are
    port group names (standard or distributed) visible to the chosen host or cluster.
    Give `resource_pool`, `host` or both; with only a host, its root pool is used.
    """

    name: str
    owner: str  # job / machine id written into the marker
    datastore: str  # name of the datastore that holds the VM's home (.vmx, logs)
    folder: str  # moid of a VM folder
    resource_pool: str | None = None
    host: str | None = None
    cpus: int = 1
    memory_mib: int = 1024
    firmware: Firmware = Firmware.BIOS
    guest_id: str = "otherLinux64Guest"
    disks: tuple[str, ...] = ()
    nics: tuple[str, ...] = ()
    controller: ControllerType = ControllerType.PVSCSI

    def __post_init__(self) -> None:
        validate_name(self.name)
        if not _OWNER_RE.fullmatch(self.owner):
            raise ValueError(f"owner {self.owner!r}: 1-128 of A-Z a-z 0-9 . _ : -")
        if self.resource_pool is None and self.host is None:
            raise ValueError("give a resource pool, a host or both")
        if self.cpus < 1 or self.memory_mib < 4 or self.memory_mib % 4:
            raise ValueError("need at least 1 CPU and a memory size in multiples of 4 MiB")
        if self.controller not in (ControllerType.PVSCSI, ControllerType.LSILOGIC):
            raise ValueError(f"controller {self.controller}: use pvscsi or lsilogic")
        if len(self.disks) > MAX_SCSI_CONTROLLERS * len(SCSI_UNITS):
            raise ValueError(f"{len(self.disks)} disks: at most 60")
        for path in self.disks:
            if not _DS_PATH_RE.fullmatch(path):
                raise ValueError(f"disk {path!r}: expected '[datastore] dir/name.vmdk'")


def find_vms(session: Session, name: str) -> list[tuple[Any, str | None]]:
    """Every VM called `name`, each with the owner in its marker (None: not ours)."""
    found = session.collect({vim.VirtualMachine: ["name", "config.annotation"]})
    return [
        (vm, marker_owner(props.get("config.annotation")))
        for vm, props in found
        if props.get("name") == name
    ]


def find_vm(session: Session, name: str, owner: str) -> Any | None:
    """Our VM `name` created for `owner`, or None. NameTaken if only others hold the name."""
    matches = find_vms(session, name)
    for vm, vm_owner in matches:
        if vm_owner == owner:
            return vm
    if matches:
        raise NameTaken(f"a VM called {name!r} exists and is not Secondsite's for {owner}")
    return None


def ensure_vm(session: Session, spec: VmSpec, timeout: float = DEFAULT_TIMEOUT) -> Any:
    """Our VM for `spec`, created unless a previous run already did; returns it."""
    existing = find_vm(session, spec.name, spec.owner)
    if existing is not None:
        log.info("VM %s for %s exists already (%s)", spec.name, spec.owner, existing._moId)
        return existing
    folder, pool, host, config = _create_args(session, spec)
    with translated(f"create VM {spec.name}"):
        task = folder.CreateVM_Task(config=config, pool=pool, host=host)
    try:
        vm = wait_for_task(task, timeout, f"create VM {spec.name}")
    except NameTaken:
        # A create from an earlier, interrupted run may have finished meanwhile.
        existing = find_vm(session, spec.name, spec.owner)
        if existing is None:
            raise
        return existing
    log.info("created VM %s for %s (%s)", spec.name, spec.owner, vm._moId)
    return vm


def _create_args(session: Session, spec: VmSpec) -> tuple[Any, Any, Any, Any]:
    folder = session.ref(vim.Folder, spec.folder)
    host = session.ref(vim.HostSystem, spec.host) if spec.host else None
    with translated(f"place VM {spec.name}"):
        if spec.resource_pool:
            pool = session.ref(vim.ResourcePool, spec.resource_pool)
        else:
            assert host is not None  # VmSpec requires one of the two
            pool = host.parent.resourcePool
        scope = host if host is not None else pool.owner  # what sees networks, datastores
        if spec.datastore not in {ds.name for ds in scope.datastore}:
            raise NotFound(f"datastore {spec.datastore!r} is not available to {scope.name}")
        networks = {net.name: net for net in scope.network}
        for name in set(spec.nics) - set(networks):
            found = _standard_portgroup(session, scope, name)
            if found is not None:
                networks[name] = found
        devices = _disk_devices(spec) + [
            vmxnet3(_nic_backing(networks, name), -300 - i) for i, name in enumerate(spec.nics)
        ]
    add = vim.vm.device.VirtualDeviceSpec.Operation.add
    config = vim.vm.ConfigSpec(
        name=spec.name,
        annotation=annotation_for(spec.owner),
        numCPUs=spec.cpus,
        memoryMB=spec.memory_mib,
        guestId=spec.guest_id,
        firmware=str(spec.firmware),
        # An explicit home: never the disks' directory, which destroying would remove.
        files=vim.vm.FileInfo(vmPathName=f"[{spec.datastore}] {spec.name}/{spec.name}.vmx"),
        # No fileOperation on disks: attach the existing files, never create or wipe.
        deviceChange=[vim.vm.device.VirtualDeviceSpec(operation=add, device=d) for d in devices],
    )
    return folder, pool, host, config


def _disk_devices(spec: VmSpec) -> list[Any]:
    devices: list[Any] = []
    per_controller = len(SCSI_UNITS)
    for bus in range((len(spec.disks) + per_controller - 1) // per_controller):
        devices.append(scsi_controller(spec.controller, -100 - bus, bus))
    for i, path in enumerate(spec.disks):
        bus, slot = divmod(i, per_controller)
        devices.append(flat_disk(path, -200 - i, -100 - bus, SCSI_UNITS[slot]))
    return devices


def _standard_portgroup(session: Session, scope: Any, name: str) -> Any | None:
    """A standard port group the hosts have configured but `scope.network` does not list.

    vcsim never adds a port group created through HostNetworkSystem to `network` (and
    vCenter may lag behind); the hosts' own network configuration is authoritative.
    """
    hosts: list[Any] = [scope] if isinstance(scope, vim.HostSystem) else list(scope.host)
    for host in hosts:
        portgroups = host.configManager.networkSystem.networkInfo.portgroup or []
        if name not in {pg.spec.name for pg in portgroups}:
            return None
    candidates = [
        net
        for net in session.objects(vim.Network)
        if net.name == name and type(net) is vim.Network  # standard, not distributed
    ]
    return candidates[0] if len(candidates) == 1 else None


def _nic_backing(networks: dict[str, Any], name: str) -> Any:
    network: Any = networks.get(name)
    if network is None:
        raise NotFound(f"port group {name!r} not found on the target host or cluster")
    if isinstance(network, vim.dvs.DistributedVirtualPortgroup):
        switch: Any = network.config.distributedVirtualSwitch
        port = vim.dvs.PortConnection(switchUuid=switch.uuid, portgroupKey=network.key)
        return vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo(port=port)
    if isinstance(network, vim.OpaqueNetwork):
        raise NotFound(f"port group {name!r} is an NSX opaque network, not supported yet")
    return vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(deviceName=name, network=network)


def power_on(vm: Any, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Power the VM on; nothing to do if it is on already."""
    with translated("power on"):
        if vm.runtime.powerState == vim.VirtualMachine.PowerState.poweredOn:
            return
        task = vm.PowerOnVM_Task()
    wait_for_task(task, timeout, f"power on {vm.name}")


def power_off(vm: Any, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Power the VM off (hard, as after a failover drill); nothing to do if it is off."""
    with translated("power off"):
        if vm.runtime.powerState == vim.VirtualMachine.PowerState.poweredOff:
            return
        task = vm.PowerOffVM_Task()
    wait_for_task(task, timeout, f"power off {vm.name}")


def destroy_vm(session: Session, name: str, owner: str, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Remove our VM `name` of `owner`, keeping its disk files. False if it was gone.

    NotOurs if a VM of that name exists without our marker for `owner`.
    """
    matches = find_vms(session, name)
    ours = [vm for vm, vm_owner in matches if vm_owner == owner]
    if not ours:
        if matches:
            raise NotOurs(f"VM {name!r} is not Secondsite's for {owner}; left alone")
        return False
    for vm in ours:
        power_off(vm, timeout)
        detach_disks(vm, timeout)
        with translated(f"destroy VM {name}"):
            task = vm.Destroy_Task()
        wait_for_task(task, timeout, f"destroy VM {name}")
        log.info("destroyed VM %s of %s", name, owner)
    return True


def detach_disks(vm: Any, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Remove the VM's disks from its configuration without deleting their files."""
    remove = vim.vm.device.VirtualDeviceSpec.Operation.remove
    with translated("detach disks"):
        devices = vm.config.hardware.device
        changes = [
            vim.vm.device.VirtualDeviceSpec(operation=remove, device=d)
            for d in devices
            if isinstance(d, vim.vm.device.VirtualDisk)
        ]
        if not changes:
            return
        task = vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=changes))
    wait_for_task(task, timeout, f"detach disks of {vm.name}")
