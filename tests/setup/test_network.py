"""Interface changes for real, inside a network namespace with a veth pair."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from appliance.setup.errors import InvalidArgument, NeedsConfirmation, NotFound
from appliance.setup.network import InterfaceConfig, Method, Network, NetworkdFiles
from tests.setup.conftest import Veth, ns_iproute

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.timeout(60)]

STATIC: dict[str, Any] = {
    "method": "static",
    "addresses": ["192.0.2.10/24", "2001:db8::10/64"],
    "gateway": "192.0.2.1",
    "dns": ["192.0.2.53", "2001:db8::53"],
}


def network(veth: Veth, tmp_path: Path, management: str | None = None) -> Network:
    return Network(ns_iproute(veth.netns), NetworkdFiles(tmp_path / "network"), management)


def record(net: Network, name: str) -> dict[str, Any]:
    return next(r for r in net.interfaces() if r["name"] == name)


def kernel_state(veth: Veth, name: str) -> tuple[set[str], set[str]]:
    """Global addresses and default gateways of `name`, read with a fresh socket."""
    with veth.iproute() as ipr:
        index = ipr.link_lookup(ifname=name)[0]
        addrs = {
            f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
            for a in ipr.get_addr(index=index)
            if a["scope"] == 0
        }
        gws = {
            r.get_attr("RTA_GATEWAY")
            for family in (2, 10)
            for r in ipr.get_routes(family=family)
            if r["dst_len"] == 0 and r.get_attr("RTA_OIF") == index and r.get_attr("RTA_GATEWAY")
        }
    return addrs, gws


def test_reads_links_without_loopback(veth: Veth, tmp_path: Path) -> None:
    net = network(veth, tmp_path)
    records = {r["name"]: r for r in net.interfaces()}
    assert set(records) == {"eth1", "sw1"}
    eth1 = records["eth1"]
    assert eth1["up"] is True
    assert len(eth1["mac"]) == 17 and eth1["mac"].count(":") == 5
    assert eth1["addresses"] == [] and eth1["gateway"] is None
    assert eth1["method"] == "default" and eth1["management"] is False


def test_static_address_gateway_dns_applied_read_back_and_persisted(
    veth: Veth, tmp_path: Path
) -> None:
    net = network(veth, tmp_path)
    config = InterfaceConfig.from_settings("eth1", STATIC)
    result = net.apply(config, confirm=False)
    assert kernel_state(veth, "eth1") == ({"192.0.2.10/24", "2001:db8::10/64"}, {"192.0.2.1"})
    assert result == record(net, "eth1")
    assert set(result["addresses"]) == {"192.0.2.10/24", "2001:db8::10/64"}
    assert result["gateway"] == "192.0.2.1"
    assert result["method"] == "static"
    assert result["dns"] == ["192.0.2.53", "2001:db8::53"]
    assert result["management"] is True  # it now carries the default route
    text = (tmp_path / "network" / "10-secondsite-eth1.network").read_text()
    body = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert body == [
        "[Match]",
        "Name=eth1",
        "[Network]",
        "Address=192.0.2.10/24",
        "Address=2001:db8::10/64",
        "Gateway=192.0.2.1",
        "DNS=192.0.2.53",
        "DNS=2001:db8::53",
    ]
    # What networkd reads at the next boot is what was asked for.
    assert net.files.read("eth1") == config


def test_changing_the_address_replaces_it_and_the_gateway(veth: Veth, tmp_path: Path) -> None:
    net = network(veth, tmp_path)
    net.apply(InterfaceConfig.from_settings("eth1", STATIC), confirm=False)
    moved = {"method": "static", "addresses": ["198.51.100.7/25"], "gateway": "198.51.100.1"}
    net.apply(InterfaceConfig.from_settings("eth1", moved), confirm=False)
    assert kernel_state(veth, "eth1") == ({"198.51.100.7/25"}, {"198.51.100.1"})
    no_gateway = {"method": "static", "addresses": ["198.51.100.7/25"]}
    net.apply(InterfaceConfig.from_settings("eth1", no_gateway), confirm=False)
    assert kernel_state(veth, "eth1") == ({"198.51.100.7/25"}, set())


def test_dhcp_switch_writes_the_file_and_drops_static_addresses(veth: Veth, tmp_path: Path) -> None:
    net = network(veth, tmp_path, management="sw1")  # eth1 is not the management link
    with veth.iproute() as ipr:  # the appliance keeps an address elsewhere
        ipr.addr("add", index=ipr.link_lookup(ifname="sw1")[0], address="203.0.113.2", prefixlen=24)
    net.apply(InterfaceConfig.from_settings("eth1", STATIC), confirm=False)
    result = net.apply(
        InterfaceConfig.from_settings("eth1", {"method": "dhcp", "dns": ["192.0.2.53"]}), False
    )
    assert kernel_state(veth, "eth1") == (set(), set())
    assert result["method"] == "dhcp" and result["addresses"] == []
    text = (tmp_path / "network" / "10-secondsite-eth1.network").read_text()
    assert "DHCP=yes\n" in text and "DNS=192.0.2.53\n" in text
    assert "Address=" not in text and "Gateway=" not in text


def test_cut_off_of_the_management_interface_needs_confirmation(veth: Veth, tmp_path: Path) -> None:
    net = network(veth, tmp_path)
    net.apply(InterfaceConfig.from_settings("eth1", STATIC), confirm=False)
    before_file = net.files.path("eth1").read_text()
    dhcp = InterfaceConfig.from_settings("eth1", {"method": "dhcp"})
    with pytest.raises(NeedsConfirmation, match="eth1 is the management interface"):
        net.apply(dhcp, confirm=False)
    # Refused means untouched: the kernel and the file are as before.
    assert kernel_state(veth, "eth1")[0] == {"192.0.2.10/24", "2001:db8::10/64"}
    assert net.files.path("eth1").read_text() == before_file
    net.apply(dhcp, confirm=True)
    assert kernel_state(veth, "eth1") == (set(), set())
    assert net.files.read("eth1") == dhcp


def test_the_last_address_of_the_appliance_needs_confirmation(veth: Veth, tmp_path: Path) -> None:
    net = network(veth, tmp_path, management="sw1")
    no_gateway = {"method": "static", "addresses": ["192.0.2.10/24"]}
    net.apply(InterfaceConfig.from_settings("eth1", no_gateway), confirm=False)
    with pytest.raises(NeedsConfirmation, match="no interface but eth1"):
        net.apply(InterfaceConfig.from_settings("eth1", {"method": "dhcp"}), confirm=False)


def test_unknown_interface_and_bad_settings(veth: Veth, tmp_path: Path) -> None:
    net = network(veth, tmp_path)
    with pytest.raises(NotFound, match="no network interface 'eth9'"):
        net.apply(InterfaceConfig.from_settings("eth9", STATIC), confirm=False)
    assert not (tmp_path / "network").exists()
    bad: list[tuple[dict[str, Any], str]] = [
        ({"method": "static"}, "at least one address"),
        ({"method": "manual"}, "'dhcp' or 'static'"),
        ({"method": "dhcp", "addresses": ["192.0.2.1/24"]}, "takes no addresses"),
        ({**STATIC, "gateway": "198.51.100.1"}, "not inside"),
        ({**STATIC, "colour": "blue"}, "unknown settings"),
        ({**STATIC, "addresses": "192.0.2.10/24"}, "list of strings"),
        ({**STATIC, "dns": ["ns1.example"]}, "not an IPv4 or IPv6"),
    ]
    for settings, fragment in bad:
        with pytest.raises(InvalidArgument, match=fragment):
            InterfaceConfig.from_settings("eth1", settings)


def test_a_failed_step_is_rolled_back(veth: Veth, tmp_path: Path) -> None:
    net = network(veth, tmp_path)
    net.apply(InterfaceConfig.from_settings("eth1", STATIC), confirm=False)
    # sw1 down: no carrier on eth1, so a new IPv6 default route via a global address
    # is fine but a route to an unreachable gateway family is refused by the kernel.
    config = InterfaceConfig(
        "eth1",
        Method.STATIC,
        (InterfaceConfig.from_settings("eth1", {"method": "static",
                                                "addresses": ["198.51.100.7/25"]}).addresses),
        gateway=__import__("ipaddress").ip_address("203.0.113.1"),  # not on the link
    )  # fmt: skip
    with pytest.raises(Exception, match="cannot configure eth1"):
        net.apply(config, confirm=False)
    assert kernel_state(veth, "eth1") == ({"192.0.2.10/24", "2001:db8::10/64"}, {"192.0.2.1"})
    assert net.files.read("eth1") == InterfaceConfig.from_settings("eth1", STATIC)
