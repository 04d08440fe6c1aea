"""Virtual hardware, both ways: read a VM's disks and NICs, build devices for a new VM.

Device keys in a new VM's spec are negative placeholders (vCenter assigns the real
ones); a disk refers to its controller by that placeholder.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

from pyVmomi import vim


class Firmware(enum.StrEnum):
    BIOS = "bios"
    EFI = "efi"


class ControllerType(enum.StrEnum):
    PVSCSI = "pvscsi"
    LSILOGIC = "lsilogic"
    LSILOGIC_SAS = "lsilogic-sas"
    BUSLOGIC = "buslogic"
    SATA = "sata"
    NVME = "nvme"
    IDE = "ide"


# Subclasses before their bases: the first isinstance match names the device.
CONTROLLER_CLASSES: tuple[tuple[type, ControllerType], ...] = (
    (vim.vm.device.ParaVirtualSCSIController, ControllerType.PVSCSI),
    (vim.vm.device.VirtualLsiLogicSASController, ControllerType.LSILOGIC_SAS),
    (vim.vm.device.VirtualLsiLogicController, ControllerType.LSILOGIC),
    (vim.vm.device.VirtualBusLogicController, ControllerType.BUSLOGIC),
    (vim.vm.device.VirtualAHCIController, ControllerType.SATA),
    (vim.vm.device.VirtualNVMEController, ControllerType.NVME),
    (vim.vm.device.VirtualIDEController, ControllerType.IDE),
)
_NIC_CLASSES: tuple[tuple[type, str], ...] = (
    (vim.vm.device.VirtualVmxnet3, "vmxnet3"),
    (vim.vm.device.VirtualVmxnet2, "vmxnet2"),
    (vim.vm.device.VirtualE1000e, "e1000e"),
    (vim.vm.device.VirtualE1000, "e1000"),
    (vim.vm.device.VirtualPCNet32, "pcnet32"),
)


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


class Record:
    """Base of the frozen records: `record()` gives the dict the configuration server stores."""

    def record(self) -> dict[str, Any]:
        """A JSON-ready dict (enums as their values, tuples as lists)."""
        out = _plain(self)
        assert isinstance(out, dict)
        return out


@dataclass(frozen=True)
class Disk(Record):
    label: str
    capacity: int | None  # bytes; None when vCenter reports none (vcsim on attached files)
    file_name: str  # "[datastore] dir/name.vmdk"
    controller: ControllerType | None
    bus: int
    unit: int


@dataclass(frozen=True)
class Nic(Record):
    label: str
    network: str  # port group name
    mac: str
    adapter: str  # vmxnet3, e1000e, ...


def controller_type(device: Any) -> ControllerType | None:
    for cls, kind in CONTROLLER_CLASSES:
        if isinstance(device, cls):
            return kind
    return None


def nic_network(backing: Any, portgroups: Mapping[str, str], names: Mapping[str, str]) -> str:
    """The port group name a NIC backing refers to (keys and moids resolved by the maps)."""
    if isinstance(backing, vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo):
        key = str(backing.port.portgroupKey)
        return portgroups.get(key, key)
    if isinstance(backing, vim.vm.device.VirtualEthernetCard.NetworkBackingInfo):
        if backing.network is not None:
            key = str(backing.network._moId)
            return names.get(key, str(backing.deviceName or key))
        return str(backing.deviceName or "")
    if isinstance(backing, vim.vm.device.VirtualEthernetCard.OpaqueNetworkBackingInfo):
        return str(backing.opaqueNetworkId)
    return ""


def read_hardware(
    devices: list[Any], portgroups: Mapping[str, str], names: Mapping[str, str]
) -> tuple[tuple[Disk, ...], tuple[Nic, ...]]:
    """Disks (in controller, unit order) and NICs of a VM's device list."""
    by_key = {d.key: d for d in devices}
    disks: list[Disk] = []
    nics: list[Nic] = []
    for device in devices:
        label = str(device.deviceInfo.label) if device.deviceInfo else str(device.key)
        if isinstance(device, vim.vm.device.VirtualDisk):
            controller = by_key.get(device.controllerKey)
            capacity = device.capacityInBytes or (device.capacityInKB or 0) * 1024 or None
            disks.append(
                Disk(
                    label=label,
                    capacity=capacity,
                    file_name=str(getattr(device.backing, "fileName", "") or ""),
                    controller=controller_type(controller),
                    bus=int(getattr(controller, "busNumber", 0) or 0),
                    unit=int(device.unitNumber or 0),
                )
            )
        elif isinstance(device, vim.vm.device.VirtualEthernetCard):
            adapter = next((n for c, n in _NIC_CLASSES if isinstance(device, c)), "other")
            nics.append(
                Nic(
                    label=label,
                    network=nic_network(device.backing, portgroups, names),
                    mac=str(device.macAddress or ""),
                    adapter=adapter,
                )
            )
    disks.sort(key=lambda d: (str(d.controller), d.bus, d.unit))
    return tuple(disks), tuple(nics)


# SCSI unit 7 is the controller's own; 15 disks per controller, 4 controllers per VM.
SCSI_UNITS = tuple(u for u in range(16) if u != 7)
MAX_SCSI_CONTROLLERS = 4
_WRITABLE_CONTROLLERS: dict[ControllerType, type] = {
    ControllerType.PVSCSI: vim.vm.device.ParaVirtualSCSIController,
    ControllerType.LSILOGIC: vim.vm.device.VirtualLsiLogicController,
}


def scsi_controller(kind: ControllerType, key: int, bus: int) -> Any:
    """A new SCSI controller of `kind` (pvscsi or lsilogic) on `bus`."""
    try:
        cls = _WRITABLE_CONTROLLERS[kind]
    except KeyError:
        raise ValueError(f"cannot create a {kind} controller; use pvscsi or lsilogic") from None
    return cls(key=key, busNumber=bus, sharedBus="noSharing")


def flat_disk(path: str, key: int, controller_key: int, unit: int) -> Any:
    """An existing flat VMDK at datastore path `path`, attached as is (no file operation)."""
    backing = vim.vm.device.VirtualDisk.FlatVer2BackingInfo(fileName=path, diskMode="persistent")
    return vim.vm.device.VirtualDisk(
        key=key, controllerKey=controller_key, unitNumber=unit, backing=backing
    )


def vmxnet3(backing: Any, key: int) -> Any:
    """A vmxnet3 NIC on `backing`, connected at power on."""
    return vim.vm.device.VirtualVmxnet3(
        key=key,
        backing=backing,
        addressType="generated",
        connectable=vim.vm.device.VirtualDevice.ConnectInfo(
            startConnected=True, allowGuestControl=True
        ),
    )
