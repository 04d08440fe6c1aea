"""Re-IP at failover: vSphere guest customization of a replica VM's network (Linux guests).

The customization is queued on the powered-off VM (CustomizeVM_Task) and applied by
VMware Tools in the guest at the next power-on. vSphere customizes every NIC at once:
a NIC given no address is set to DHCP. Windows guests need a Sysprep identity
(licence, administrator password) that the replica settings do not carry: refused.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from typing import Any

from pyVmomi import vim

from appliance.vsphere.errors import VSphereError
from appliance.vsphere.tasks import DEFAULT_TIMEOUT, translated, wait_for_task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NicAddress:
    """A static IPv4 address for one NIC ("10.0.0.5/24") and its optional gateway."""

    interface: str
    gateway: str | None = None

    def __post_init__(self) -> None:
        iface = ipaddress.ip_interface(self.interface)  # ValueError names the flaw
        if iface.version != 4 or "/" not in self.interface:
            raise ValueError(f"{self.interface!r}: an IPv4 address with its prefix, e.g. /24")
        if self.gateway is not None and ipaddress.ip_address(self.gateway) not in iface.network:
            raise ValueError(f"gateway {self.gateway} is not in {iface.network}")


@dataclass(frozen=True)
class Customization:
    hostname: str  # the guest's host name (short)
    domain: str
    nics: tuple[NicAddress | None, ...]  # per NIC in device order; None: DHCP
    dns_servers: tuple[str, ...] = ()


def spec_for(custom: Customization) -> Any:
    adapters = []
    for nic in custom.nics:
        if nic is None:
            adapter = vim.vm.customization.IPSettings(ip=vim.vm.customization.DhcpIpGenerator())
        else:
            iface = ipaddress.ip_interface(nic.interface)
            adapter = vim.vm.customization.IPSettings(
                ip=vim.vm.customization.FixedIp(ipAddress=str(iface.ip)),
                subnetMask=str(iface.netmask),
                gateway=[nic.gateway] if nic.gateway else [],
            )
        adapters.append(vim.vm.customization.AdapterMapping(adapter=adapter))
    return vim.vm.customization.Specification(
        identity=vim.vm.customization.LinuxPrep(
            hostName=vim.vm.customization.FixedName(name=custom.hostname),
            domain=custom.domain,
        ),
        globalIPSettings=vim.vm.customization.GlobalIPSettings(
            dnsServerList=list(custom.dns_servers)
        ),
        nicSettingMap=adapters,
    )


def customize(vm: Any, custom: Customization, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Queue `custom` on the VM for its next power-on. False, doing nothing, when the VM
    is already on or has a customization pending (a re-run after a crash)."""
    with translated("customize"):
        guest_id = str(vm.config.guestId or "")
        if guest_id.lower().startswith("win"):
            raise VSphereError(
                f"VM {vm.name} runs Windows ({guest_id}): re-IP needs a Sysprep identity, "
                "not supported; change its address in the guest after failover"
            )
        if vm.runtime.powerState != vim.VirtualMachine.PowerState.poweredOff:
            return False
        if vm.config.tools is not None and vm.config.tools.pendingCustomization:
            return False
        task = vm.CustomizeVM_Task(spec=spec_for(custom))
    wait_for_task(task, timeout, f"customize {vm.name}")
    log.info("VM %s: re-IP queued for its next power-on", vm.name)
    return True
