"""Discovery: what a vCenter holds, as frozen records the configuration server stores.

One property-collector pass over a container view reads every entity (a handful of
round trips however large the inventory), then the records are assembled locally.
Objects are identified by managed object id (`moid`, e.g. "vm-57"): unique and
stable within one vCenter, unlike names (folders and VMs may repeat a name).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from pyVmomi import vim

from appliance.vsphere.hardware import (
    Disk,
    Firmware,
    Nic,
    Record,
    read_hardware,
)
from appliance.vsphere.session import Session


class PowerState(enum.StrEnum):
    ON = "poweredOn"
    OFF = "poweredOff"
    SUSPENDED = "suspended"


class NetworkKind(enum.StrEnum):
    STANDARD = "standard"  # a host port group (one Network object per name)
    DISTRIBUTED = "distributed"
    OPAQUE = "opaque"  # NSX


class FolderKind(enum.StrEnum):
    DATACENTER = "datacenter"
    VM = "vm"
    HOST = "host"
    DATASTORE = "datastore"
    NETWORK = "network"


@dataclass(frozen=True)
class Datacenter(Record):
    moid: str
    name: str
    vm_folder: str  # moid of its root VM folder, the default place for new VMs


@dataclass(frozen=True)
class Cluster(Record):
    moid: str
    name: str
    datacenter: str
    resource_pool: str  # moid of the root pool
    hosts: tuple[str, ...]  # host names


@dataclass(frozen=True)
class Host(Record):
    moid: str
    name: str
    datacenter: str
    cluster: str | None  # cluster name; None for a standalone host
    resource_pool: str  # root pool of its cluster or standalone compute resource
    connection_state: str
    maintenance: bool
    datastores: tuple[str, ...]
    networks: tuple[str, ...]


@dataclass(frozen=True)
class Datastore(Record):
    moid: str
    name: str
    datacenter: str
    url: str
    capacity: int  # bytes
    free: int  # bytes
    type: str  # VMFS, NFS, vsan, ...
    accessible: bool


@dataclass(frozen=True)
class Network(Record):
    moid: str
    name: str
    datacenter: str
    kind: NetworkKind
    switch: str | None  # distributed switch name
    portgroup_key: str | None  # distributed port group key (what a NIC backing names)
    uplink: bool  # a distributed switch's uplink port group: not for VMs


@dataclass(frozen=True)
class Folder(Record):
    moid: str
    name: str
    datacenter: str | None  # None for folders above the datacenters
    kind: FolderKind
    path: str  # inventory path, e.g. "DC0/vm/replicas"


@dataclass(frozen=True)
class ResourcePool(Record):
    moid: str
    name: str
    datacenter: str
    owner: str  # cluster or standalone compute resource name
    parent: str | None  # moid of the parent pool; None for a root pool
    vapp: bool


@dataclass(frozen=True)
class VirtualMachine(Record):
    moid: str
    name: str
    datacenter: str
    folder: str | None  # moid; None inside a vApp
    resource_pool: str | None
    host: str | None
    cpus: int
    memory_mib: int
    firmware: Firmware
    guest_id: str
    power_state: PowerState
    uuid: str  # instance UUID
    vmx_path: str
    annotation: str
    template: bool
    disks: tuple[Disk, ...]
    nics: tuple[Nic, ...]
    # The SMBIOS UUID, what the guest reads in /sys/class/dmi/id/product_uuid (how an
    # enrolled agent is matched to its VM); "" when vCenter reports none.
    bios_uuid: str = ""


@dataclass(frozen=True)
class Inventory(Record):
    datacenters: tuple[Datacenter, ...]
    clusters: tuple[Cluster, ...]
    hosts: tuple[Host, ...]
    datastores: tuple[Datastore, ...]
    networks: tuple[Network, ...]
    folders: tuple[Folder, ...]
    resource_pools: tuple[ResourcePool, ...]
    vms: tuple[VirtualMachine, ...]

    def vm(self, name: str) -> VirtualMachine:
        """The VM called `name` (KeyError if none; the first if several)."""
        for vm in self.vms:
            if vm.name == name:
                return vm
        raise KeyError(name)


# Property paths read per type (subtypes included, as the property collector does).
_PATHS: dict[type, list[str]] = {
    vim.ManagedEntity: ["name", "parent"],
    vim.Datacenter: ["vmFolder"],
    vim.Folder: ["childType"],
    vim.ComputeResource: ["resourcePool", "host"],
    vim.HostSystem: (
        ["datastore", "network", "runtime.connectionState", "runtime.inMaintenanceMode"]
    ),
    vim.Datastore: [
        "summary.url",
        "summary.capacity",
        "summary.freeSpace",
        "summary.type",
        "summary.accessible",
    ],
    vim.dvs.DistributedVirtualPortgroup: ["key", "config.distributedVirtualSwitch", "tag"],
    vim.DistributedVirtualSwitch: ["config.uplinkPortgroup"],
    vim.ResourcePool: ["owner"],
    vim.VirtualMachine: [
        "resourcePool",
        "runtime.host",
        "runtime.powerState",
        "config.hardware.numCPU",
        "config.hardware.memoryMB",
        "config.hardware.device",
        "config.firmware",
        "config.guestId",
        "config.instanceUuid",
        "config.uuid",
        "config.annotation",
        "config.template",
        "config.files.vmPathName",
    ],
}


def moid(obj: Any) -> str:
    return str(obj._moId)


class _Graph:
    """Collected properties keyed by moid, with the parent chain for locating things."""

    def __init__(self, items: list[tuple[Any, dict[str, Any]]]) -> None:
        self.objs = {moid(o): o for o, _ in items}
        self.props = {moid(o): p for o, p in items}

    def of(self, kind: type) -> list[tuple[str, dict[str, Any]]]:
        return sorted(
            ((k, self.props[k]) for k, o in self.objs.items() if isinstance(o, kind)),
            key=lambda kv: (str(kv[1].get("name", "")), kv[0]),
        )

    def name(self, ref: Any) -> str:
        return str(self.props.get(moid(ref), {}).get("name", moid(ref)))

    def ancestors(self, key: str) -> list[str]:
        chain = []
        parent = self.props.get(key, {}).get("parent")
        while parent is not None:
            chain.append(moid(parent))
            parent = self.props.get(moid(parent), {}).get("parent")
        return chain

    def datacenter(self, key: str) -> str | None:
        for ancestor in [key, *self.ancestors(key)]:
            if isinstance(self.objs.get(ancestor), vim.Datacenter):
                return str(self.props[ancestor]["name"])
        return None

    def path(self, key: str) -> str:
        # The container view leaves out the root folder itself, so the path starts at
        # the top-level datacenter (or folder), as vSphere inventory paths do.
        chain = reversed([key, *self.ancestors(key)])
        return "/".join(str(self.props[k]["name"]) for k in chain if k in self.props)


def _folder_kind(child_types: list[str]) -> FolderKind:
    for marker, kind in (
        ("VirtualMachine", FolderKind.VM),
        ("ComputeResource", FolderKind.HOST),
        ("Datastore", FolderKind.DATASTORE),
        ("Network", FolderKind.NETWORK),
    ):
        if marker in child_types:
            return kind
    return FolderKind.DATACENTER


def discover(session: Session) -> Inventory:
    """Read the whole inventory of the session's vCenter (blocking)."""
    graph = _Graph(session.collect(_PATHS))
    names = {key: str(p.get("name", key)) for key, p in graph.props.items()}
    dc = graph.datacenter

    uplinks: set[str] = set()
    switches: dict[str, str] = {}
    for key, p in graph.of(vim.DistributedVirtualSwitch):
        switches[key] = str(p["name"])
        uplinks.update(moid(pg) for pg in p.get("config.uplinkPortgroup") or [])
    portgroups: dict[str, str] = {}
    networks: list[Network] = []
    for key, p in graph.of(vim.Network):
        obj = graph.objs[key]
        if isinstance(obj, vim.dvs.DistributedVirtualPortgroup):
            tags = {t.key for t in p.get("tag") or []}
            switch = p.get("config.distributedVirtualSwitch")
            portgroups[str(p["key"])] = str(p["name"])
            networks.append(
                Network(
                    moid=key,
                    name=str(p["name"]),
                    datacenter=dc(key) or "",
                    kind=NetworkKind.DISTRIBUTED,
                    switch=switches.get(moid(switch)) if switch is not None else None,
                    portgroup_key=str(p["key"]),
                    uplink=key in uplinks or "SYSTEM/DVS.UPLINKPG" in tags,
                )
            )
        else:
            kind = (
                NetworkKind.OPAQUE if isinstance(obj, vim.OpaqueNetwork) else NetworkKind.STANDARD
            )
            networks.append(
                Network(key, str(p["name"]), dc(key) or "", kind, None, None, uplink=False)
            )

    clusters: list[Cluster] = []
    root_pools: dict[str, str] = {}  # compute resource moid -> root pool moid
    for key, p in graph.of(vim.ComputeResource):
        root_pools[key] = moid(p["resourcePool"])
        if isinstance(graph.objs[key], vim.ClusterComputeResource):
            members = tuple(sorted(graph.name(h) for h in p.get("host") or []))
            clusters.append(Cluster(key, str(p["name"]), dc(key) or "", root_pools[key], members))

    hosts: list[Host] = []
    for key, p in graph.of(vim.HostSystem):
        owner = moid(p["parent"])
        in_cluster = isinstance(graph.objs.get(owner), vim.ClusterComputeResource)
        hosts.append(
            Host(
                moid=key,
                name=str(p["name"]),
                datacenter=dc(key) or "",
                cluster=graph.name(p["parent"]) if in_cluster else None,
                resource_pool=root_pools.get(owner, ""),
                connection_state=str(p.get("runtime.connectionState", "")),
                maintenance=bool(p.get("runtime.inMaintenanceMode", False)),
                datastores=tuple(sorted(graph.name(d) for d in p.get("datastore") or [])),
                networks=tuple(sorted(graph.name(n) for n in p.get("network") or [])),
            )
        )

    datastores = [
        Datastore(
            moid=key,
            name=str(p["name"]),
            datacenter=dc(key) or "",
            url=str(p.get("summary.url", "")),
            capacity=int(p.get("summary.capacity", 0)),
            free=int(p.get("summary.freeSpace", 0)),
            type=str(p.get("summary.type", "")),
            accessible=bool(p.get("summary.accessible", False)),
        )
        for key, p in graph.of(vim.Datastore)
    ]
    folders = [
        Folder(
            key,
            str(p["name"]),
            dc(key),
            _folder_kind(list(p.get("childType") or [])),
            graph.path(key),
        )
        for key, p in graph.of(vim.Folder)
    ]
    pools = []
    for key, p in graph.of(vim.ResourcePool):
        above = p.get("parent")
        parent_is_pool = above is not None and isinstance(
            graph.objs.get(moid(above)), vim.ResourcePool
        )
        pools.append(
            ResourcePool(
                moid=key,
                name=str(p["name"]),
                datacenter=dc(key) or "",
                owner=graph.name(p["owner"]),
                parent=moid(above) if parent_is_pool else None,
                vapp=isinstance(graph.objs[key], vim.VirtualApp),
            )
        )

    vms = []
    for key, p in graph.of(vim.VirtualMachine):
        pool = p.get("resourcePool")
        host = p.get("runtime.host")
        folder = p.get("parent")
        disks, nics = read_hardware(list(p.get("config.hardware.device") or []), portgroups, names)
        vms.append(
            VirtualMachine(
                moid=key,
                name=str(p["name"]),
                datacenter=dc(key) or (dc(moid(pool)) if pool is not None else None) or "",
                folder=moid(folder) if folder is not None else None,
                resource_pool=moid(pool) if pool is not None else None,
                host=graph.name(host) if host is not None else None,
                cpus=int(p.get("config.hardware.numCPU", 0)),
                memory_mib=int(p.get("config.hardware.memoryMB", 0)),
                firmware=Firmware(p.get("config.firmware") or Firmware.BIOS),
                guest_id=str(p.get("config.guestId", "")),
                power_state=PowerState(p.get("runtime.powerState", PowerState.OFF)),
                uuid=str(p.get("config.instanceUuid", "")),
                bios_uuid=str(p.get("config.uuid", "")).lower(),
                vmx_path=str(p.get("config.files.vmPathName", "")),
                annotation=str(p.get("config.annotation") or ""),
                template=bool(p.get("config.template", False)),
                disks=disks,
                nics=nics,
            )
        )
    return Inventory(
        datacenters=tuple(
            Datacenter(key, str(p["name"]), moid(p["vmFolder"]))
            for key, p in graph.of(vim.Datacenter)
        ),
        clusters=tuple(clusters),
        hosts=tuple(hosts),
        datastores=tuple(datastores),
        networks=tuple(networks),
        folders=tuple(folders),
        resource_pools=tuple(pools),
        vms=tuple(vms),
    )
