"""A machine's replica settings (where its VM goes at failover) and recovery-point choice.

The settings are stored as one JSON object in the machine's ``replica`` column and
checked here on every write (`parse`), so a failover never discovers a bad setting at
the worst possible moment. vSphere objects are named by managed object id, as
discovery reports them; datastores and port groups by name, as specs use them::

    {"vcenter": "vc-dr",                 # a registered vCenter (vcenters.py)
     "datacenter": "DC0",                # informational; optional
     "datastore": "LocalDS_0",           # home of the VM's .vmx and logs
     "disk_datastore": "LocalDS_0",      # the datastore that is the master target's
                                         #   datastore directory (default: datastore)
     "target_dir": "/var/lib/secondsite/target/datastore",
                                         # that directory as the master target sees it
     "folder": "group-v3", "resource_pool": "resgroup-22", "host": null,
     "cluster": "domain-c21",            # where isolated port groups go (or host)
     "nics": ["eth0"],                   # source NIC labels in order (default: the
                                         #   network_map keys)
     "network_map": {"eth0": "VM Network"},  # NIC label or index -> port group
     "cpus": 2, "memory_mib": 4096, "firmware": "efi", "guest_id": "debian11_64Guest",
     "vm_name": "web01",                 # default: the machine name
     "source": {"vcenter": "vc-prod", "vm": "web01", "moid": "vm-42",
                "bios_uuid": "4201..."},  # the protected VM (protect_vm.py); optional
     "reip": {"eth0": {"address": "10.9.0.5/24", "gateway": "10.9.0.1"}},
     "dns_servers": ["10.9.0.53"], "dns_domain": "dr.example"}
                                         # optional re-IP at failover (NIC label or
                                         #   index -> IPv4/prefix; other NICs: DHCP)
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from appliance.config.errors import InvalidArgument
from appliance.vsphere.customize import Customization, NicAddress

_VM_NAME = re.compile(r"[^A-Za-z0-9 ._-]+")
_HOST = re.compile(r"[^A-Za-z0-9-]+")


class Firmware(StrEnum):
    BIOS = "bios"
    EFI = "efi"


class PointChoice(StrEnum):
    LATEST = "latest"
    LATEST_APP = "latest-app"


_REQUIRED = ("vcenter", "datastore", "target_dir", "folder")
_TEXT = ("vcenter", "datacenter", "datastore", "disk_datastore", "target_dir", "folder")
_OPTIONAL_TEXT = ("resource_pool", "host", "cluster", "guest_id", "vm_name", "dns_domain")
_KEYS = frozenset(
    (*_TEXT, *_OPTIONAL_TEXT, "nics", "network_map", "cpus", "memory_mib", "firmware", "source",
     "reip", "dns_servers")
)  # fmt: skip
_SOURCE_KEYS = frozenset(("vcenter", "vm", "moid", "bios_uuid"))


@dataclass(frozen=True)
class ReplicaSettings:
    vcenter: str
    datastore: str
    disk_datastore: str
    target_dir: str
    folder: str
    resource_pool: str | None
    host: str | None
    cluster: str | None
    nics: tuple[str, ...]
    network_map: dict[str, str]
    cpus: int
    memory_mib: int
    firmware: Firmware
    guest_id: str
    vm_name: str | None
    datacenter: str | None = None
    source: dict[str, str] | None = None  # the protected VM, when protected by VM
    reip: dict[str, NicAddress] = field(default_factory=dict)  # NIC label/index -> address
    dns_servers: tuple[str, ...] = ()
    dns_domain: str | None = None

    @classmethod
    def parse(cls, value: Any) -> ReplicaSettings:
        """Check a stored or submitted settings object; InvalidArgument names the flaw."""

        def bad(why: str) -> InvalidArgument:
            return InvalidArgument(f"replica settings: {why}")

        if not isinstance(value, dict):
            raise bad(f"must be a mapping, got {value!r}")
        unknown = sorted(set(value) - _KEYS)
        if unknown:
            raise bad(f"unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_KEYS))}")
        missing = [k for k in _REQUIRED if not value.get(k)]
        if missing:
            raise bad(f"missing {', '.join(missing)}")
        for key in (*_TEXT, *_OPTIONAL_TEXT):
            v = value.get(key)
            if v is not None and (not isinstance(v, str) or not v or len(v) > 255):
                raise bad(f"{key} must be a non-empty string")
        if not str(value["target_dir"]).startswith("/"):
            raise bad("target_dir must be an absolute path")
        if not value.get("resource_pool") and not value.get("host"):
            raise bad("give a resource_pool, a host or both")
        network_map = value.get("network_map") or {}
        if not isinstance(network_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v for k, v in network_map.items()
        ):
            raise bad("network_map must map NIC labels or indexes to port group names")
        nics = value.get("nics")
        if nics is None:
            nics = sorted(
                network_map, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k)
            )
        if not isinstance(nics, list) or not all(isinstance(n, str) and n for n in nics):
            raise bad("nics must be a list of NIC labels")
        source = value.get("source")
        if source is not None and not (
            isinstance(source, dict)
            and set(source) <= _SOURCE_KEYS
            and all(isinstance(v, str) and len(v) <= 255 for v in source.values())
        ):
            raise bad(f"source must map {', '.join(sorted(_SOURCE_KEYS))} to strings")
        reip = _reip(value.get("reip") or {}, bad)
        known = {*nics, *(str(i) for i in range(len(nics)))}
        if stray := sorted(set(reip) - known):
            raise bad(f"reip names no NIC of nics: {', '.join(stray)}")
        dns = value.get("dns_servers") or []
        if not isinstance(dns, list) or not all(_is_ip(d) for d in dns):
            raise bad("dns_servers must be a list of IP addresses")
        cpus, memory = value.get("cpus", 1), value.get("memory_mib", 1024)
        for key, number in (("cpus", cpus), ("memory_mib", memory)):
            if not isinstance(number, int) or isinstance(number, bool) or number < 1:
                raise bad(f"{key} must be a positive integer")
        if memory % 4:
            raise bad("memory_mib must be a multiple of 4")
        try:
            firmware = Firmware(value.get("firmware", Firmware.BIOS))
        except ValueError:
            raise bad(f"firmware must be one of {', '.join(Firmware)}") from None
        return cls(
            vcenter=value["vcenter"],
            datastore=value["datastore"],
            disk_datastore=value.get("disk_datastore") or value["datastore"],
            target_dir=str(value["target_dir"]).rstrip("/") or "/",
            folder=value["folder"],
            resource_pool=value.get("resource_pool"),
            host=value.get("host"),
            cluster=value.get("cluster"),
            nics=tuple(nics),
            network_map=dict(network_map),
            cpus=cpus,
            memory_mib=memory,
            firmware=firmware,
            guest_id=value.get("guest_id") or "otherLinux64Guest",
            vm_name=value.get("vm_name"),
            datacenter=value.get("datacenter"),
            source=dict(source) if source else None,
            reip=reip,
            dns_servers=tuple(dns),
            dns_domain=value.get("dns_domain"),
        )

    @property
    def compute(self) -> str | None:
        """The host or cluster an isolated port group must exist on."""
        return self.host or self.cluster

    def vm_name_for(self, machine: str) -> str:
        """The failover VM's name: the setting, or the machine name made VM-safe."""
        return self.vm_name or (_VM_NAME.sub("-", machine).strip(" .-_") or "replica")[:72]

    def datastore_path(self, local: str) -> str:
        """ "[disk_datastore] rel/path.vmdk" for a file the master target wrote locally."""
        prefix = self.target_dir.rstrip("/") + "/"
        if not local.startswith(prefix):
            raise InvalidArgument(
                f"{local} is not under the master target's datastore directory "
                f"{self.target_dir}; fix target_dir in the replica settings"
            )
        return f"[{self.disk_datastore}] {local[len(prefix) :]}"

    def port_group(self, index: int, label: str, overrides: dict[str, str] | None) -> str | None:
        """The port group for source NIC `index`/`label` (overrides first), None if unmapped."""
        for table in (overrides or {}, self.network_map):
            for key in (label, str(index)):
                if key in table:
                    return table[key]
        return None

    def customization(self, hostname: str) -> Customization | None:
        """The re-IP for the failover VM (None: none asked), NICs in order."""
        if not self.reip:
            return None
        nics = tuple(
            self.reip.get(label) or self.reip.get(str(i)) for i, label in enumerate(self.nics)
        )
        short = _HOST.sub("-", hostname.partition(".")[0]).strip("-")[:63] or "replica"
        return Customization(short, self.dns_domain or "localdomain", nics, self.dns_servers)


def _reip(value: Any, bad: Callable[[str], InvalidArgument]) -> dict[str, NicAddress]:
    if not isinstance(value, dict):
        raise bad("reip must map NIC labels or indexes to {address, gateway}")
    out = {}
    for nic, entry in value.items():
        if not isinstance(entry, dict) or set(entry) - {"address", "gateway"}:
            raise bad(f"reip.{nic} must be {{'address': 'A.B.C.D/N', 'gateway': 'A.B.C.D'}}")
        try:
            out[str(nic)] = NicAddress(str(entry.get("address")), entry.get("gateway"))
        except ValueError as exc:
            raise bad(f"reip.{nic}: {exc}") from None
    return out


def _is_ip(value: Any) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def check(what: str, value: Any) -> dict[str, Any]:
    """The migrations' column check: the settings as given, once they parse."""
    ReplicaSettings.parse(value)
    return dict(value)


def pick_point(points: list[dict[str, Any]], want: Any, machine: str) -> dict[str, Any]:
    """The recovery point `want` names among a master target's `points` answer.

    `want`: "latest", "latest-app", a tag id, or a time (Unix seconds, or ISO 8601 —
    UTC unless it carries an offset) meaning the newest usable point at or before it.
    InvalidArgument (a message for the operator) when there is none.
    """
    usable = sorted((p for p in points if p.get("usable")), key=lambda p: int(p["time_ns"]))
    hint = f"list them with 'secondsitectl points {machine}'"
    if want in (None, PointChoice.LATEST, PointChoice.LATEST_APP):
        pool = [p for p in usable if want != PointChoice.LATEST_APP or p.get("kind") == "app"]
        if not pool:
            kind = "app-consistent " if want == PointChoice.LATEST_APP else ""
            raise InvalidArgument(f"{machine} has no usable {kind}recovery point; {hint}")
        return pool[-1]
    if isinstance(want, str):
        for p in points:
            if p["tag_id"] == want:
                if not p.get("usable"):
                    raise InvalidArgument(
                        f"recovery point {want!r} of {machine} is not usable (its journal "
                        f"records are damaged or pruned); pick another, {hint}"
                    )
                return p
    cutoff = _as_time(want)
    if cutoff is None:
        raise InvalidArgument(f"{machine} has no recovery point {want!r}; {hint}")
    before = [p for p in usable if int(p["time_ns"]) <= cutoff * 1e9]
    if not before:
        raise InvalidArgument(f"{machine} has no usable recovery point at or before {want}; {hint}")
    return before[-1]


def _as_time(want: Any) -> float | None:
    if isinstance(want, int | float) and not isinstance(want, bool):
        return float(want)
    if not isinstance(want, str):
        return None
    try:
        when = datetime.fromisoformat(want)
    except ValueError:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
