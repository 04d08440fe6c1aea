"""First boot: the OVF environment parsed, checked per property, and applied once.

The apply tests run `secondsite-firstboot` as a program inside the veth fixture's
network namespace (`ip netns exec`) and a UTS namespace of its own (`unshare --uts`),
so it sets addresses, routes and the kernel hostname for real without touching the
host's. Roles go to the systemd user instance of tests/setup/user_systemd.py.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.setup import ovfenv
from appliance.setup.firstboot import DONE
from appliance.setup.network import Method
from appliance.setup.roles import Role, Roles
from appliance.setup.systemd import SystemdClient
from tests.setup.conftest import Veth
from tests.setup.ovfdoc import environment
from tests.setup.user_systemd import UserSystemd

STATIC = {
    "hostname": "DR01.example.com",
    "role": "all",
    "network.mode": "static",
    "network.address": "192.0.2.10/24",
    "network.gateway": "192.0.2.1",
    "network.dns": "192.0.2.53, 198.51.100.53",
}


# -- parsing ---------------------------------------------------------------------------


def test_parses_what_vsphere_writes(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "appliance.setup.ovfenv")
    settings = ovfenv.parse(environment({**STATIC, "vami.timezone": "UTC"}))
    assert settings.errors == ()
    assert settings.hostname == "dr01.example.com"
    assert settings.roles == (Role.CONFIG, Role.PROCESS, Role.TARGET)
    assert settings.adapter_macs == ("00:50:56:8a:3c:01",)
    assert settings.network is not None
    assert settings.network.as_settings() == {
        "method": "static",
        "addresses": ["192.0.2.10/24"],
        "gateway": "192.0.2.1",
        "dns": ["192.0.2.53", "198.51.100.53"],
    }
    assert "ignoring OVF property 'vami.timezone'" in caplog.text


def test_defaults_set_only_dhcp() -> None:
    """The OVF's defaults: empty hostname, role "console", DHCP: the console asks."""
    defaults = {"hostname": "", "role": "console", "network.mode": "dhcp",
                "network.address": "", "network.gateway": "", "network.dns": ""}  # fmt: skip
    settings = ovfenv.parse(environment(defaults))
    assert (settings.hostname, settings.roles, settings.errors) == (None, None, ())
    assert settings.network == ovfenv.NetworkSettings(Method.DHCP)
    assert ovfenv.parse(environment({k: "" for k in defaults})).empty


def test_one_role() -> None:
    assert ovfenv.parse(environment({"role": "target"})).roles == (Role.TARGET,)


def test_dhcp_ignores_static_fields(caplog: pytest.LogCaptureFixture) -> None:
    settings = ovfenv.parse(environment({**STATIC, "network.mode": "dhcp"}))
    assert settings.network == ovfenv.NetworkSettings(Method.DHCP) and settings.errors == ()
    assert "ignoring OVF property network.address: network.mode is dhcp" in caplog.text


BAD = {
    "hostname": ("-dr01-", "each dot-separated part"),
    "role": ("web", "unknown role 'web'"),
    "network.address": ("192.0.2.10", "needs a prefix length"),
    "network.gateway": ("198.51.100.1", "is not inside 192.0.2.0/24"),
    "network.dns": ("192.0.2.53,dns.example.com", "is not an IPv4 or IPv6 address"),
    "network.mode": ("manual", "'manual' is not dhcp or static"),
}


@pytest.mark.parametrize("key", sorted(BAD))
def test_a_bad_value_is_rejected_alone(key: str) -> None:
    value, message = BAD[key]
    settings = ovfenv.parse(environment({**STATIC, key: value}))
    assert [(e.key, message in e.message) for e in settings.errors] == [(key, True)]
    if key != "hostname":
        assert settings.hostname == "dr01.example.com"
    if key != "role":
        assert settings.roles == tuple(Role)
    if key in ("network.gateway", "network.dns"):  # the address still goes on
        assert settings.network is not None and str(settings.network.address) == "192.0.2.10/24"


@pytest.mark.parametrize(
    "text",
    ["", "not xml", "<Envelope xmlns='http://schemas.dmtf.org/ovf/envelope/1'/>"],
)
def test_not_an_environment(text: str) -> None:
    with pytest.raises(ovfenv.OvfEnvError):
        ovfenv.parse(text)


# -- the program -----------------------------------------------------------------------


def firstboot(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance.setup.firstboot", *args],
        capture_output=True, text=True, timeout=60, check=False, env=env,
    )  # fmt: skip


def firstboot_in(veth: Veth, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["unshare", "--uts", "ip", "netns", "exec", veth.netns,
         sys.executable, "-m", "appliance.setup.firstboot", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def mac_of(veth: Veth) -> str:
    with veth.iproute() as ipr:
        return str(ipr.get_links(ifname=veth.inner)[0].get_attr("IFLA_ADDRESS"))


def addresses_and_gateway(veth: Veth) -> tuple[set[str], set[str]]:
    with veth.iproute() as ipr:
        index = ipr.link_lookup(ifname=veth.inner)[0]
        addrs = {
            f"{m.get_attr('IFA_ADDRESS')}/{m['prefixlen']}"
            for m in ipr.get_addr(index=index, family=2)
        }
        gws = {str(r.get_attr("RTA_GATEWAY")) for r in ipr.get_default_routes(family=2)}
    return addrs, gws


def test_no_properties_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    path = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
    done = firstboot("--root", str(root), "--source", "guestinfo", env=path)  # no vmtoolsd
    assert done.returncode == 0, done.stderr
    assert "vmtoolsd is not installed" in done.stderr
    # vmtoolsd on a VM deployed without vApp options.
    fake = bin_dir / "vmtoolsd"
    fake.write_text("#!/bin/sh\necho 'No value found' >&2\nexit 1\n")
    fake.chmod(0o755)
    done = firstboot("--root", str(root), "--source", "guestinfo", env=path)
    assert done.returncode == 0 and "No value found" in done.stderr, done.stderr
    # Neither transport: not VMware (no DMI vendor here), and an empty CD-ROM drive.
    done = firstboot("--root", str(root), "--cdrom", str(tmp_path / "sr0"), env=path)
    assert done.returncode == 0, done.stderr
    assert "not on VMware" in done.stderr and "no medium" in done.stderr, done.stderr
    empty = tmp_path / "empty.xml"
    empty.write_text("\n")
    done = firstboot("--root", str(root), "--env-file", str(empty))
    assert done.returncode == 0 and "console's setup screen will ask" in done.stderr
    assert not root.exists()


def test_not_an_environment_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "env.xml"
    bad.write_text("<html/>")
    done = firstboot("--root", str(tmp_path / "root"), "--env-file", str(bad))
    assert done.returncode == 3
    assert done.stderr.strip().splitlines()[-1].startswith("secondsite-firstboot: error: not an")
    assert not (tmp_path / "root").exists()


@pytest.mark.integration
@pytest.mark.root
@pytest.mark.timeout(120)
def test_applies_everything_once(veth: Veth, user_systemd: UserSystemd,
                                 tmp_path: Path) -> None:  # fmt: skip
    if not shutil.which("ip"):
        pytest.skip("needs ip(8) for ip netns exec")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)  # a root has /etc; the network directory is made
    env_file = tmp_path / "ovf-env.xml"
    # The VMware adapter's MAC picks the management interface out of eth1 and sw1.
    env_file.write_text(environment(STATIC, macs=(mac_of(veth),)))
    args = ["--root", str(root), "--env-file", str(env_file),
            "--systemd-bus", user_systemd.address]  # fmt: skip
    done = firstboot_in(veth, *args)
    assert done.returncode == 0, done.stderr
    assert "applied: hostname, network, roles" in done.stderr

    assert (root / "etc/hostname").read_text() == "dr01.example.com\n"
    network = (root / "etc/systemd/network/10-secondsite-eth1.network").read_text()
    for line in ("Name=eth1", "Address=192.0.2.10/24", "Gateway=192.0.2.1",
                 "DNS=192.0.2.53", "DNS=198.51.100.53"):  # fmt: skip
        assert line in network.splitlines()
    assert addresses_and_gateway(veth) == ({"192.0.2.10/24"}, {"192.0.2.1"})
    roles = Roles(SystemdClient(user_systemd.address)).get()
    assert all(state["enabled"] for state in roles.values()), roles
    assert (root / DONE).read_text() == "applied: hostname network roles\n"

    # Second boot: the marker makes it a no-op even with other properties.
    env_file.write_text(environment({**STATIC, "hostname": "other"}, macs=(mac_of(veth),)))
    again = firstboot_in(veth, *args)
    assert again.returncode == 0 and "already done" in again.stderr, again.stderr
    assert (root / "etc/hostname").read_text() == "dr01.example.com\n"


@pytest.mark.integration
@pytest.mark.root
def test_bad_properties_reported_good_ones_applied(veth: Veth, tmp_path: Path) -> None:
    if not shutil.which("ip"):
        pytest.skip("needs ip(8) for ip netns exec")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    env_file = tmp_path / "ovf-env.xml"
    bad = {**STATIC, "hostname": "-dr01-", "role": "console",
           "network.gateway": "198.51.100.1", "network.dns": "192.0.2.53,nope"}  # fmt: skip
    env_file.write_text(environment(bad, macs=()))
    done = firstboot_in(veth, "--root", str(root), "--env-file", str(env_file),
                        "--systemd-bus", "none", "--management", veth.inner)  # fmt: skip
    assert done.returncode == 3, done.stderr
    errors = [line for line in done.stderr.splitlines() if "OVF property" in line]
    assert [e.split("OVF property ")[1].split(":")[0] for e in errors] == [
        "hostname",
        "network.gateway",
        "network.dns",
    ], done.stderr
    assert not (root / "etc/hostname").exists()
    network = (root / "etc/systemd/network/10-secondsite-eth1.network").read_text()
    assert "Address=192.0.2.10/24" in network and "Gateway=" not in network
    assert addresses_and_gateway(veth) == ({"192.0.2.10/24"}, set())
    assert (root / DONE).read_text() == "applied: network\n"
    assert os.stat(root / DONE).st_mode & 0o777 == 0o644
