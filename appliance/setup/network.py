"""Network interfaces: read and changed with pyroute2, persisted for systemd-networkd.

A change is applied to the running kernel at once (addresses, default route, link up)
and then written as a `.network` file so that systemd-networkd sets up the same after
a reboot. DNS servers take effect through that file only (networkd hands them to
systemd-resolved when it reads it); the DHCP client is networkd's own.

The management interface is the one given to `Network`, else the one carrying the
default route. A change that leaves it — or the whole appliance — without an address
is refused with NeedsConfirmation unless the caller confirms.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Any

from pyroute2 import NetlinkError

from appliance.setup import validate
from appliance.setup.errors import Failed, InvalidArgument, NeedsConfirmation, NotFound
from appliance.storage.atomic import atomic_write

_log = logging.getLogger(__name__)

Record = dict[str, Any]
DEFAULT_DIRECTORY = Path("/etc/systemd/network")
FILE_PREFIX = "10-secondsite-"  # sorts before the image's DHCP-on-every-link default
IFF_UP = 0x1
IFF_LOOPBACK = 0x8
IFA_F_PERMANENT = 0x80  # a static address; DHCP/SLAAC ones carry a lifetime instead
RT_SCOPE_UNIVERSE = 0
MAIN_TABLE = 254
DYNAMIC_PROTOCOLS = frozenset({9, 16})  # RTPROT_RA, RTPROT_DHCP: routes a lease or RA made
SETTING_KEYS = frozenset({"method", "addresses", "gateway", "dns"})


class Method(StrEnum):
    DHCP = "dhcp"
    STATIC = "static"


@dataclass(frozen=True)
class InterfaceConfig:
    """What setup wants on one interface; `render`/`parse` are its `.network` file.

    File format (one file per interface, `10-secondsite-<name>.network`)::

        [Match]
        Name=<interface>
        [Network]
        DHCP=yes                 (method dhcp)
        Address=<ip>/<prefix>    (method static; one line per address)
        Gateway=<ip>             (static, optional)
        DNS=<ip>                 (optional, one line per server)
    """

    name: str
    method: Method
    addresses: tuple[validate.IPInterface, ...] = ()
    gateway: validate.IPAddress | None = None
    dns: tuple[validate.IPAddress, ...] = ()

    @classmethod
    def from_settings(cls, name: str, settings: Mapping[str, Any]) -> InterfaceConfig:
        """Validate SetInterface's a{sv}: method, addresses (as), gateway (s), dns (as)."""
        unknown = sorted(set(settings) - SETTING_KEYS)
        if unknown:
            raise InvalidArgument(
                f"unknown settings {unknown}; known: {', '.join(sorted(SETTING_KEYS))}"
            )
        try:
            method = Method(settings.get("method", ""))
        except ValueError:
            raise InvalidArgument("method must be 'dhcp' or 'static'") from None
        addresses = tuple(validate.interface_address(a) for a in _strings(settings, "addresses"))
        dns = tuple(validate.dns_server(s) for s in _strings(settings, "dns"))
        gw_text = settings.get("gateway", "")
        if not isinstance(gw_text, str):
            raise InvalidArgument("gateway must be a string")
        if method is Method.DHCP:
            if addresses or gw_text:
                raise InvalidArgument("method 'dhcp' takes no addresses or gateway")
            return cls(name, method, dns=dns)
        if not addresses:
            raise InvalidArgument("method 'static' needs at least one address")
        gateway = validate.gateway(gw_text, list(addresses)) if gw_text else None
        return cls(name, method, addresses, gateway, dns)

    def render(self) -> str:
        lines = [
            "# Written by secondsite-setupd (org.secondsite.Setup1.SetInterface): the",
            "# console rewrites this file. It sorts before the image's DHCP default.",
            "[Match]",
            f"Name={self.name}",
            "",
            "[Network]",
        ]
        if self.method is Method.DHCP:
            lines.append("DHCP=yes")
        lines += [f"Address={a}" for a in self.addresses]
        if self.gateway is not None:
            lines.append(f"Gateway={self.gateway}")
        lines += [f"DNS={d}" for d in self.dns]
        return "\n".join(lines) + "\n"

    @classmethod
    def parse(cls, text: str) -> InterfaceConfig:
        values: dict[str, list[str]] = {}
        for raw in text.splitlines():
            line = raw.strip()
            if line and not line.startswith(("#", ";", "[")) and "=" in line:
                key, _, value = line.partition("=")
                values.setdefault(key.strip(), []).append(value.strip())
        name = values.get("Name", [""])[0]
        dhcp = values.get("DHCP", ["no"])[0] in ("yes", "true", "ipv4", "ipv6")
        gateway = values.get("Gateway", [None])[0]
        return cls(
            name,
            Method.DHCP if dhcp else Method.STATIC,
            tuple(ipaddress.ip_interface(a) for a in values.get("Address", [])),
            ipaddress.ip_address(gateway) if gateway else None,
            tuple(ipaddress.ip_address(d) for d in values.get("DNS", [])),
        )


def _strings(settings: Mapping[str, Any], key: str) -> list[str]:
    value = settings.get(key, [])
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"{key} must be a list of strings")
    return list(value)


class NetworkdFiles:
    """The `.network` files setup owns in one directory (default /etc/systemd/network)."""

    def __init__(self, directory: Path = DEFAULT_DIRECTORY) -> None:
        self.directory = directory

    def path(self, name: str) -> Path:
        return self.directory / f"{FILE_PREFIX}{name}.network"

    def read(self, name: str) -> InterfaceConfig | None:
        try:
            return InterfaceConfig.parse(self.path(name).read_text())
        except FileNotFoundError:
            return None
        except ValueError as exc:  # edited by hand into something we cannot read
            _log.warning("ignoring %s: %s", self.path(name), exc)
            return None

    def write(self, config: InterfaceConfig) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path(config.name), config.render().encode(), 0o644)


@dataclass
class _Link:
    index: int
    name: str
    mac: str
    state: str
    up: bool
    static: list[validate.IPInterface] = field(default_factory=list)
    dynamic: list[validate.IPInterface] = field(default_factory=list)
    gateways: list[validate.IPAddress] = field(default_factory=list)
    dynamic_gateways: set[validate.IPAddress] = field(default_factory=set)

    @property
    def addresses(self) -> list[validate.IPInterface]:
        return self.static + self.dynamic


class Network:
    """Reads and changes interfaces through `iproute()` (a pyroute2 IPRoute, possibly
    bound to a network namespace), persisting changes in `files`."""

    def __init__(
        self,
        iproute: Callable[[], Any],
        files: NetworkdFiles,
        management: str | None = None,
    ) -> None:
        self._iproute = iproute
        self.files = files
        self._management = management

    @contextmanager
    def _ipr(self) -> Iterator[Any]:
        try:
            ipr = self._iproute()
        except (NetlinkError, OSError) as exc:
            raise Failed(f"cannot open a netlink socket: {exc}") from None
        try:
            yield ipr
        finally:
            ipr.close()

    # -- reading -----------------------------------------------------------------------

    def _links(self, ipr: Any) -> dict[str, _Link]:
        links: dict[str, _Link] = {}
        by_index: dict[int, _Link] = {}
        for msg in ipr.get_links():
            if msg["flags"] & IFF_LOOPBACK:
                continue
            link = _Link(
                msg["index"],
                msg.get_attr("IFLA_IFNAME"),
                msg.get_attr("IFLA_ADDRESS") or "",
                str(msg.get_attr("IFLA_OPERSTATE") or "unknown").lower(),
                bool(msg["flags"] & IFF_UP),
            )
            links[link.name] = by_index[link.index] = link
        for msg in ipr.get_addr():
            owner = by_index.get(msg["index"])
            if owner is None or msg["scope"] != RT_SCOPE_UNIVERSE:
                continue  # loopback, or link-local: not what an operator sets
            ip = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            iface = ipaddress.ip_interface(f"{ip}/{msg['prefixlen']}")
            flags = msg.get_attr("IFA_FLAGS") or msg["flags"]
            (owner.static if flags & IFA_F_PERMANENT else owner.dynamic).append(iface)
        for family in (socket.AF_INET, socket.AF_INET6):
            for route in self._default_routes(ipr, family):
                via = by_index.get(route.get_attr("RTA_OIF"))
                gw = route.get_attr("RTA_GATEWAY")
                if via is not None and gw:
                    via.gateways.append(ipaddress.ip_address(gw))
                    if route["proto"] in DYNAMIC_PROTOCOLS:
                        via.dynamic_gateways.add(ipaddress.ip_address(gw))
        return links

    @staticmethod
    def _default_routes(ipr: Any, family: int) -> list[Any]:
        return [
            r
            for r in ipr.get_routes(family=family, table=MAIN_TABLE)
            if r["dst_len"] == 0 and r.get_attr("RTA_TABLE", MAIN_TABLE) == MAIN_TABLE
        ]

    def _management_of(self, links: Mapping[str, _Link]) -> str | None:
        if self._management is not None:
            return self._management
        for link in links.values():  # IPv4 default route first, as ordered in _links
            if link.gateways:
                return link.name
        return None

    def management_interface(self) -> str:
        """The management interface's name, or "" when there is none."""
        with self._ipr() as ipr:
            return self._management_of(self._links(ipr)) or ""

    def interfaces(self) -> list[Record]:
        with self._ipr() as ipr:
            links = self._links(ipr)
        management = self._management_of(links)
        return [self._record(link, link.name == management) for link in links.values()]

    def _record(self, link: _Link, management: bool) -> Record:
        config = self.files.read(link.name)
        return {
            "name": link.name,
            "mac": link.mac,
            "state": link.state,
            "up": link.up,
            "addresses": [str(a) for a in link.addresses],
            "gateway": str(link.gateways[0]) if link.gateways else None,
            "method": config.method.value if config else "default",
            "dns": [str(d) for d in config.dns] if config else [],
            "management": management,
        }

    # -- changing ----------------------------------------------------------------------

    def apply(self, config: InterfaceConfig, confirm: bool) -> Record:
        """Apply `config` to the running system, then persist it; the interface's record."""
        with self._ipr() as ipr:
            links = self._links(ipr)
            link = links.get(config.name)
            if link is None:
                raise NotFound(f"no network interface {config.name!r}")
            self._check_cut_off(config, link, links, confirm)
            self._apply(ipr, config, link)
            after = self._links(ipr)
        self.files.write(config)
        _log.info("interface %s set to %s", config.name, config.render().splitlines()[5:])
        return self._record(after[config.name], config.name == self._management_of(after))

    def _check_cut_off(
        self, config: InterfaceConfig, link: _Link, links: Mapping[str, _Link], confirm: bool
    ) -> None:
        # DHCP keeps only a lease already held; until one arrives the link has none.
        remaining = config.addresses if config.method is Method.STATIC else link.dynamic
        if remaining or confirm:
            return
        if link.name == self._management_of(links):
            raise NeedsConfirmation(
                f"{link.name} is the management interface and would have no address until "
                "a DHCP lease arrives: sessions over it would be cut off; confirm to go on"
            )
        if not any(other.addresses for other in links.values() if other is not link):
            raise NeedsConfirmation(
                f"no interface but {link.name} has an address, and it would have none "
                "until a DHCP lease arrives; confirm to go on"
            )

    def _apply(self, ipr: Any, config: InterfaceConfig, link: _Link) -> None:
        undo: list[Callable[[], Any]] = []
        idx = link.index
        try:
            if not link.up:
                ipr.link("set", index=idx, state="up")
                undo.append(partial(ipr.link, "set", index=idx, state="down"))
            # Routes go before addresses: deleting an address makes the kernel drop the
            # routes through it, and a later "del" of those would fail.
            for gw in link.gateways:
                if gw == config.gateway or not _drops(config.method, gw, link):
                    continue
                _default_route(ipr, "del", idx, gw)
                undo.append(partial(_default_route, ipr, "replace", idx, gw))
            for new in config.addresses:
                if new not in link.static:  # "replace" turns a leased one permanent
                    _addr(ipr, "replace", idx, new)
                    if new not in link.dynamic:
                        undo.append(partial(_addr, ipr, "del", idx, new))
            wanted = set(config.addresses)
            for old in link.static:
                if old not in wanted:
                    _addr(ipr, "del", idx, old)
                    undo.append(partial(_addr, ipr, "add", idx, old))
            if config.gateway is not None:
                # Last, and even when present: the kernel may have dropped it with an address.
                _default_route(ipr, "replace", idx, config.gateway)
        except NetlinkError as exc:
            self._roll_back(undo, config.name)
            raise Failed(f"cannot configure {config.name}: {exc}") from None

    @staticmethod
    def _roll_back(undo: list[Callable[[], Any]], name: str) -> None:
        for step in reversed(undo):
            try:
                step()
            except NetlinkError as exc:  # keep undoing the rest; the state is reported
                _log.warning("rolling back %s: a step failed: %s", name, exc)


def _drops(method: Method, gw: validate.IPAddress, link: _Link) -> bool:
    """Whether a default route goes: DHCP keeps those a lease made; static keeps
    IPv6 router advertisements' (they come back with the next RA anyway)."""
    if gw not in link.dynamic_gateways:
        return True
    return method is Method.STATIC and gw.version == 4


def _addr(ipr: Any, command: str, index: int, iface: validate.IPInterface) -> None:
    ipr.addr(command, index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)


def _default_route(ipr: Any, command: str, index: int, gw: validate.IPAddress) -> None:
    dst = "0.0.0.0/0" if gw.version == 4 else "::/0"
    ipr.route(command, dst=dst, gateway=str(gw), oif=index, table=MAIN_TABLE)
