"""Every input form setup accepts or refuses, table by table."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

import pytest

from appliance.setup import validate
from appliance.setup.errors import InvalidArgument

GOOD: list[tuple[Callable[..., Any], tuple[Any, ...], Any]] = [
    (validate.interface_address, ("192.0.2.10/24",), ipaddress.ip_interface("192.0.2.10/24")),
    (validate.interface_address, (" 10.0.0.1/8 ",), ipaddress.ip_interface("10.0.0.1/8")),
    (validate.interface_address, ("192.0.2.0/31",), ipaddress.ip_interface("192.0.2.0/31")),
    (validate.interface_address, ("2001:db8::10/64",), ipaddress.ip_interface("2001:db8::10/64")),
    (validate.hostname, ("dr-appliance-01",), "dr-appliance-01"),
    (validate.hostname, ("DR01.Example.COM",), "dr01.example.com"),
    (validate.hostname, ("a" * 63,), "a" * 63),
    (validate.dns_name, ("ntp.example.org",), "ntp.example.org"),
    (validate.dns_name, ("x1.y2",), "x1.y2"),
    (validate.ntp_server, ("pool.ntp.org",), "pool.ntp.org"),
    (validate.ntp_server, ("192.0.2.123",), "192.0.2.123"),
    (validate.ntp_server, ("2001:DB8::1",), "2001:db8::1"),
    (validate.dns_server, ("192.0.2.53",), ipaddress.ip_address("192.0.2.53")),
    (validate.server_address, ("config.dr.example:9440",), ("config.dr.example", 9440)),
    (validate.server_address, ("config",), ("config", 9440)),
    (validate.server_address, ("192.0.2.5:1234",), ("192.0.2.5", 1234)),
    (validate.server_address, ("[2001:db8::5]:9440",), ("2001:db8::5", 9440)),
    (validate.server_address, ("2001:db8::5",), ("2001:db8::5", 9440)),
    (validate.interface_name, ("ens192",), "ens192"),
    (validate.interface_name, ("eth0.100",), "eth0.100"),
]

BAD: list[tuple[Callable[..., Any], tuple[Any, ...], str]] = [
    (validate.interface_address, ("192.0.2.10",), "needs a prefix length"),
    (validate.interface_address, ("192.0.2.10/33",), "not an address with a prefix"),
    (validate.interface_address, ("192.0.2.0/24",), "network address"),
    (validate.interface_address, ("192.0.2.255/24",), "broadcast address"),
    (validate.interface_address, ("0.0.0.0/8",), "cannot be"),
    (validate.interface_address, ("127.0.0.2/8",), "cannot be"),
    (validate.interface_address, ("224.0.0.5/24",), "cannot be"),
    (validate.interface_address, ("169.254.1.1/16",), "cannot be"),
    (validate.interface_address, ("10.0.0.1/0",), "prefix length 0"),
    (validate.interface_address, ("fe80::1/64",), "cannot be"),
    (validate.interface_address, ("banana/24",), "not an address"),
    (validate.interface_address, ("",), "empty"),
    (validate.hostname, ("-dr01",), "1-63 letters"),
    (validate.hostname, ("dr01-",), "1-63 letters"),
    (validate.hostname, ("dr_01",), "1-63 letters"),
    (validate.hostname, ("dr..example",), "1-63 letters"),
    (validate.hostname, ("a" * 64 + ".b",), "longer than 64"),
    (validate.hostname, ("b" * 65,), "longer than 64"),
    (validate.hostname, ("host.123",), "all digits"),
    (validate.hostname, ("   ",), "empty"),
    (validate.hostname, ("hôte",), "1-63 letters"),
    (validate.dns_name, ("ex ample.org",), "1-63 letters"),
    (validate.dns_name, ("a" * 64 + ".org",), "1-63 letters"),
    (validate.dns_name, (("a" * 60 + ".") * 5,), "longer than 253"),
    (validate.ntp_server, ("192.0.2",), "neither an IPv4 address"),
    (validate.ntp_server, ("999.1.1.1",), "neither an IPv4 address"),
    (validate.ntp_server, ("ntp.example.org.",), "1-63 letters"),
    (validate.dns_server, ("ns1.example.org",), "not an IPv4 or IPv6"),
    (validate.dns_server, ("0.0.0.0",), "cannot be a DNS server"),
    (validate.server_address, ("config:0",), "between 1 and 65535"),
    (validate.server_address, ("config:65536",), "between 1 and 65535"),
    (validate.server_address, ("config:http",), "between 1 and 65535"),
    (validate.server_address, ("[2001:db8::5:9440",), "use [IPv6]:PORT"),
    (validate.server_address, ("bad_host:9440",), "1-63 letters"),
    (validate.interface_name, ("../etc",), "not a network interface"),
    (validate.interface_name, ("eth 0",), "not a network interface"),
    (validate.interface_name, ("a" * 16,), "longer than 15"),
]


@pytest.mark.parametrize(("check", "args", "expected"), GOOD)
def test_good_inputs(check: Callable[..., Any], args: tuple[Any, ...], expected: Any) -> None:
    assert check(*args) == expected


@pytest.mark.parametrize(("check", "args", "fragment"), BAD)
def test_bad_inputs(check: Callable[..., Any], args: tuple[Any, ...], fragment: str) -> None:
    with pytest.raises(InvalidArgument, match=fragment.replace("[", r"\[")):
        check(*args)


ADDRS = [ipaddress.ip_interface("192.0.2.10/24"), ipaddress.ip_interface("2001:db8::10/64")]

GATEWAYS: list[tuple[str, str | None]] = [
    ("192.0.2.1", None),
    ("2001:db8::1", None),
    ("fe80::1", None),  # IPv6 link-local: on-link by definition
    ("198.51.100.1", "not inside 192.0.2.0/24"),
    ("192.0.2.10", "own address"),
    ("192.0.2.255", "not inside"),
    ("192.0.2.0", "not inside"),
    ("0.0.0.0", "cannot be a gateway"),
    ("gateway", "not an IPv4 or IPv6"),
]


@pytest.mark.parametrize(("gateway", "fragment"), GATEWAYS)
def test_gateways(gateway: str, fragment: str | None) -> None:
    if fragment is None:
        assert str(validate.gateway(gateway, ADDRS)) == gateway
    else:
        with pytest.raises(InvalidArgument, match=fragment):
            validate.gateway(gateway, ADDRS)


def test_gateway_needs_an_address_of_its_family() -> None:
    with pytest.raises(InvalidArgument, match="no IPv6 address"):
        validate.gateway("2001:db8::1", ADDRS[:1])
