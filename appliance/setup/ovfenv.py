"""The OVF environment: the vApp properties vSphere hands the appliance at deployment.

With the guestInfo transport (image/secondsite.ovf.in) vSphere puts an OVF environment
document in `guestinfo.ovfEnv`; `vmtoolsd --cmd "info-get guestinfo.ovfEnv"` prints it.
Only two parts of it matter here::

    <Environment xmlns="http://schemas.dmtf.org/ovf/environment/1"
                 xmlns:oe="http://schemas.dmtf.org/ovf/environment/1"
                 xmlns:ve="http://www.vmware.com/schema/ovfenv" ...>
      <PropertySection>
        <Property oe:key="hostname" oe:value="dr01.example.com"/>   (one per key)
      </PropertySection>
      <ve:EthernetAdapterSection>
        <ve:Adapter ve:mac="00:50:56:..." ve:network="VM Network" .../>
      </ve:EthernetAdapterSection>
    </Environment>

The keys are the ProductSection's in image/secondsite.ovf.in. Every value is checked
with `validate`; a bad one is reported (one `PropertyError` each) and left out, so the
good ones can still be applied. An empty value means "not set": the console asks.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from appliance.setup import validate
from appliance.setup.errors import InvalidArgument
from appliance.setup.network import Method
from appliance.setup.roles import Role

_log = logging.getLogger(__name__)

OVFENV_NS = "http://schemas.dmtf.org/ovf/environment/1"
VMWARE_NS = "http://www.vmware.com/schema/ovfenv"
MAX_DOCUMENT = 1 << 20  # vSphere's documents are a few KiB; refuse anything absurd


class Key(StrEnum):
    HOSTNAME = "hostname"
    ROLE = "role"
    NETWORK_MODE = "network.mode"
    NETWORK_ADDRESS = "network.address"
    NETWORK_GATEWAY = "network.gateway"
    NETWORK_DNS = "network.dns"


class RoleChoice(StrEnum):
    """The `role` property's ValueMap: a role, all of them, or "ask on the console"."""

    CONSOLE = "console"
    ALL = "all"
    CONFIG = "config"
    PROCESS = "process"
    TARGET = "target"

    def roles(self) -> tuple[Role, ...] | None:
        if self is RoleChoice.CONSOLE:
            return None
        if self is RoleChoice.ALL:
            return tuple(Role)
        return (Role(self.value),)


class OvfEnvError(Exception):
    """The document is not an OVF environment at all (not one property's fault)."""


@dataclass(frozen=True)
class PropertyError:
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


@dataclass(frozen=True)
class NetworkSettings:
    method: Method
    address: validate.IPInterface | None = None
    gateway: validate.IPAddress | None = None
    dns: tuple[validate.IPAddress, ...] = ()

    def as_settings(self) -> dict[str, Any]:
        """SetupCore.set_interface's settings (the same a{sv} the console sends)."""
        settings: dict[str, Any] = {"method": self.method.value}
        if self.address is not None:
            settings["addresses"] = [str(self.address)]
        if self.gateway is not None:
            settings["gateway"] = str(self.gateway)
        if self.dns:
            settings["dns"] = [str(d) for d in self.dns]
        return settings


@dataclass(frozen=True)
class OvfSettings:
    """What the environment sets; None where it sets nothing (the console asks)."""

    hostname: str | None = None
    roles: tuple[Role, ...] | None = None
    network: NetworkSettings | None = None
    adapter_macs: tuple[str, ...] = ()  # vSphere's order: the first is the first NIC
    errors: tuple[PropertyError, ...] = field(default=(), compare=False)

    @property
    def empty(self) -> bool:
        return self.hostname is None and self.roles is None and self.network is None


def parse(text: str) -> OvfSettings:
    """Parse an OVF environment document; raise OvfEnvError if it is not one."""
    if len(text) > MAX_DOCUMENT:
        raise OvfEnvError(f"the OVF environment is larger than {MAX_DOCUMENT} bytes")
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise OvfEnvError(f"the OVF environment is not XML: {exc}") from None
    if root.tag != f"{{{OVFENV_NS}}}Environment":
        raise OvfEnvError(f"not an OVF environment: the document element is {root.tag}")
    values: dict[Key, str] = {}
    for prop in root.iterfind(f"{{{OVFENV_NS}}}PropertySection/{{{OVFENV_NS}}}Property"):
        name = prop.get(f"{{{OVFENV_NS}}}key", "")
        value = prop.get(f"{{{OVFENV_NS}}}value", "").strip()
        try:
            values[Key(name)] = value
        except ValueError:
            _log.info("ignoring OVF property %r: not one of the appliance's", name)
    macs = tuple(
        adapter.get(f"{{{VMWARE_NS}}}mac", "").lower()
        for adapter in root.iterfind(
            f"{{{VMWARE_NS}}}EthernetAdapterSection/{{{VMWARE_NS}}}Adapter"
        )
    )
    return _settings({k: v for k, v in values.items() if v}, macs)


def _settings(values: dict[Key, str], macs: tuple[str, ...]) -> OvfSettings:
    errors: list[PropertyError] = []

    def check(key: Key, fn: Any) -> Any:
        try:
            return fn(values[key])
        except InvalidArgument as exc:
            errors.append(PropertyError(key.value, exc.message))
            return None

    hostname = check(Key.HOSTNAME, validate.hostname) if Key.HOSTNAME in values else None
    roles = None
    if Key.ROLE in values:
        choice = check(Key.ROLE, _role_choice)
        roles = choice.roles() if choice is not None else None
    network = _network(values, errors)
    return OvfSettings(hostname, roles, network, tuple(m for m in macs if m), tuple(errors))


def _role_choice(value: str) -> RoleChoice:
    try:
        return RoleChoice(value)
    except ValueError:
        known = ", ".join(c.value for c in RoleChoice)
        raise InvalidArgument(f"unknown role {value!r}; choose one of {known}") from None


def _network(values: dict[Key, str], errors: list[PropertyError]) -> NetworkSettings | None:
    mode = values.get(Key.NETWORK_MODE)
    static_keys = [k for k in (Key.NETWORK_ADDRESS, Key.NETWORK_GATEWAY, Key.NETWORK_DNS)
                   if k in values]  # fmt: skip
    if mode is None:
        if static_keys:
            errors.append(PropertyError(Key.NETWORK_MODE.value, "empty, but addresses are set"))
        return None
    try:
        method = Method(mode)
    except ValueError:
        errors.append(PropertyError(Key.NETWORK_MODE.value, f"{mode!r} is not dhcp or static"))
        return None
    if method is Method.DHCP:
        for key in static_keys:  # the OVF's descriptions say "static only"
            _log.warning("ignoring OVF property %s: network.mode is dhcp", key.value)
        return NetworkSettings(Method.DHCP)
    try:
        address = validate.interface_address(values.get(Key.NETWORK_ADDRESS, ""))
    except InvalidArgument as exc:
        # Without its address a static setup cannot be applied at all: DHCP stays.
        errors.append(PropertyError(Key.NETWORK_ADDRESS.value, exc.message))
        return None
    gateway = None
    if Key.NETWORK_GATEWAY in values:
        try:
            gateway = validate.gateway(values[Key.NETWORK_GATEWAY], [address])
        except InvalidArgument as exc:
            errors.append(PropertyError(Key.NETWORK_GATEWAY.value, exc.message))
    dns = []
    for server in values.get(Key.NETWORK_DNS, "").split(","):
        if server.strip():
            try:
                dns.append(validate.dns_server(server))
            except InvalidArgument as exc:
                errors.append(PropertyError(Key.NETWORK_DNS.value, exc.message))
    return NetworkSettings(Method.STATIC, address, gateway, tuple(dns))
