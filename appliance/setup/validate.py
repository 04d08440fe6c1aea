"""Every input of the setup service, checked before anything changes.

Each function returns the value in its canonical form or raises InvalidArgument with
one line an operator can act on. Addresses and prefixes go through `ipaddress`;
names follow RFC 1123 (letters, digits and inner hyphens, labels of 1-63 characters).
"""

from __future__ import annotations

import ipaddress
import re

from appliance.setup.errors import InvalidArgument

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

MAX_DNS_NAME = 253  # RFC 1035, without the trailing dot
MAX_HOSTNAME = 64  # the kernel's HOST_NAME_MAX: sethostname refuses longer
MAX_IFNAME = 15  # IFNAMSIZ - 1
DEFAULT_CONFIG_PORT = 9440  # the configuration server's enrolment port
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_IFNAME_BAD = re.compile(r"[/\s:]")


def _text(value: str, what: str, limit: int = 1024) -> str:
    text = value.strip() if isinstance(value, str) else ""
    if not text:
        raise InvalidArgument(f"{what} is empty")
    if len(text) > limit:
        raise InvalidArgument(f"{what} is longer than {limit} characters")
    return text


def ip_address(value: str, what: str = "address") -> IPAddress:
    text = _text(value, what)
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise InvalidArgument(f"{what} {text!r} is not an IPv4 or IPv6 address") from None


def interface_address(value: str) -> IPInterface:
    """An address with its prefix ("192.0.2.10/24", "2001:db8::10/64") for a static setup."""
    text = _text(value, "address")
    if "/" not in text:
        raise InvalidArgument(f"address {text!r} needs a prefix length, e.g. {text}/24")
    try:
        iface = ipaddress.ip_interface(text)
    except ValueError:
        raise InvalidArgument(f"{text!r} is not an address with a prefix length") from None
    ip, net = iface.ip, iface.network
    if net.prefixlen == 0:
        raise InvalidArgument(f"prefix length 0 in {text!r} is not usable on an interface")
    if ip.is_unspecified or ip.is_loopback or ip.is_multicast or ip.is_link_local:
        raise InvalidArgument(f"{ip} cannot be an interface's static address")
    if _edge(ip, net):
        what = "network" if ip == net.network_address else "broadcast"
        raise InvalidArgument(f"{ip} is the {what} address of {net}")
    return iface


def _edge(ip: IPAddress, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    """An IPv4 network or broadcast address (not hosts, except in /31 and /32)."""
    return (
        ip.version == 4
        and net.prefixlen < 31
        and ip in (net.network_address, net.broadcast_address)
    )


def gateway(value: str, addresses: list[IPInterface]) -> IPAddress:
    """A default gateway reachable on the link: inside the network of one of the
    addresses (IPv6 link-local gateways are on-link by definition)."""
    gw = ip_address(value, "gateway")
    if gw.is_unspecified or gw.is_multicast or gw.is_loopback:
        raise InvalidArgument(f"{gw} cannot be a gateway")
    same_family = [a for a in addresses if a.version == gw.version]
    if not same_family:
        raise InvalidArgument(f"gateway {gw} has no IPv{gw.version} address to be reached from")
    if gw.version == 6 and gw.is_link_local:
        return gw
    for addr in same_family:
        net = addr.network
        if gw == addr.ip:
            raise InvalidArgument(f"gateway {gw} is the interface's own address")
        if gw in net and not _edge(gw, net):
            return gw
    nets = ", ".join(str(a.network) for a in same_family)
    raise InvalidArgument(f"gateway {gw} is not inside {nets}")


def dns_server(value: str) -> IPAddress:
    server = ip_address(value, "DNS server")
    if server.is_unspecified or server.is_multicast:
        raise InvalidArgument(f"{server} cannot be a DNS server")
    return server


def _labels(text: str, what: str) -> str:
    name = text.lower()
    labels = name.split(".")
    for label in labels:
        if not _LABEL.match(label):
            raise InvalidArgument(
                f"{what} {text!r}: each dot-separated part must be 1-63 letters, digits "
                "or inner hyphens"
            )
    if labels[-1].isdigit():
        raise InvalidArgument(f"{what} {text!r}: the last part cannot be all digits")
    return name


def hostname(value: str) -> str:
    """A static hostname: one label or a fully qualified name, at most 64 characters."""
    text = _text(value, "hostname", limit=MAX_HOSTNAME)
    return _labels(text, "hostname")


def dns_name(value: str) -> str:
    """A DNS name as an operator types it (no trailing dot), at most 253 characters."""
    text = _text(value, "DNS name", limit=MAX_DNS_NAME)
    return _labels(text, "DNS name")


def host(value: str, what: str = "server") -> str:
    """A DNS name or an IP address, canonical."""
    text = _text(value, what, limit=MAX_DNS_NAME)
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    if re.fullmatch(r"[0-9.]+", text):
        raise InvalidArgument(f"{what} {text!r} is neither an IPv4 address nor a DNS name")
    return _labels(text, what)


def ntp_server(value: str) -> str:
    return host(value, "NTP server")


def server_address(value: str) -> tuple[str, int]:
    """HOST[:PORT] or [IPv6]:PORT of the configuration server (default port 9440)."""
    text = _text(value, "configuration server address", limit=MAX_DNS_NAME + 8)
    port_text = ""
    if text.startswith("["):
        inner, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise InvalidArgument(f"{text!r}: use [IPv6]:PORT")
        name, port_text = inner, rest[1:]
    elif text.count(":") == 1:
        name, _, port_text = text.partition(":")
    else:
        name = text  # a bare IPv6 address or a name without a port
    port = DEFAULT_CONFIG_PORT
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise InvalidArgument(f"port {port_text!r} is not between 1 and 65535")
        port = int(port_text)
    return host(name, "configuration server"), port


def interface_name(value: str) -> str:
    text = _text(value, "interface name", limit=MAX_IFNAME)
    if text in (".", "..") or _IFNAME_BAD.search(text):
        raise InvalidArgument(f"{text!r} is not a network interface name")
    return text
