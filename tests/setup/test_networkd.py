"""After SetInterface writes its file, systemd-networkd is asked to reload — a real
networkd, run inside the test's network namespace.

networkd runs in the veth's namespace and in a private mount namespace of its own:
/run is a tmpfs there (its state files), the test's networkd directory is bound over
/etc/systemd/network, and /sys is read-only so networkd does not wait for udev (there
is none). It joins a private system-like bus that has networkd's own policy file.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import dbus
import dbus.bus
import pytest

from appliance.lab.bus import PrivateBus, start_private_bus
from appliance.setup.core import SetupCore
from appliance.setup.hostname import Hostname
from appliance.setup.network import Network, NetworkdFiles
from appliance.setup.networkd import DESTINATION, RELOADED, Networkd
from appliance.setup.registration import Registration
from appliance.setup.time import Ntp
from tests.setup.conftest import Veth, ns_iproute

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.timeout(120)]

NETWORKD = Path("/lib/systemd/systemd-networkd")
POLICY = Path("/usr/share/dbus-1/system.d/org.freedesktop.network1.conf")
_SCRIPT = """
set -eu
mount -t tmpfs tmpfs /run
mount -o remount,bind,ro /sys
mkdir -p /run/systemd/netif
chown systemd-network:systemd-network /run/systemd/netif
mount --bind "$NETWORK_DIR" /etc/systemd/network
exec /lib/systemd/systemd-networkd
"""


@pytest.fixture
def bus() -> Iterator[PrivateBus]:
    if not NETWORKD.exists() or not POLICY.exists():
        pytest.skip("needs systemd-networkd and its D-Bus policy")
    directory = Path(tempfile.mkdtemp(prefix="secondsite-networkd-bus-"))
    directory.chmod(0o755)  # networkd drops to the systemd-network user
    bus = start_private_bus(directory, [POLICY])
    yield bus
    bus.stop()
    shutil.rmtree(directory, ignore_errors=True)


def bus_address(bus: PrivateBus) -> str:
    return f"unix:path={bus.socket}"  # sd-bus refuses dbus-daemon's address with a guid


def start_networkd(
    veth: Veth, network_dir: Path, bus: PrivateBus, log: Path
) -> subprocess.Popen[bytes]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "DBUS_SYSTEM_BUS_ADDRESS": bus_address(bus),
        "NETWORK_DIR": str(network_dir),
    }
    process = subprocess.Popen(
        ["ip", "netns", "exec", veth.netns, "unshare", "--mount", "--propagation", "private",
         "bash", "-c", _SCRIPT],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log.open("wb"),
    )  # fmt: skip
    connection = dbus.bus.BusConnection(bus.address)
    try:
        deadline = time.monotonic() + 20
        while not connection.name_has_owner(DESTINATION):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"systemd-networkd did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)
    finally:
        connection.close()
    return process


def network_file_of(bus: PrivateBus, name: str) -> str:
    """The .network file networkd uses for link `name` (its own Describe)."""
    connection = dbus.bus.BusConnection(bus.address)
    try:
        call = connection.call_blocking
        manager = ("/org/freedesktop/network1", "org.freedesktop.network1.Manager")
        _, path = call(DESTINATION, *manager, "GetLinkByName", "s", [name], timeout=10)
        text = call(DESTINATION, str(path), "org.freedesktop.network1.Link", "Describe", "", [],
                    timeout=10)  # fmt: skip
    finally:
        connection.close()
    return str(json.loads(str(text)).get("NetworkFile", ""))


def core(tmp_path: Path, veth: Veth, networkd: Networkd) -> tuple[SetupCore, Path]:
    network_dir = tmp_path / "network"
    network_dir.mkdir()
    (tmp_path / "etc").mkdir()
    return SetupCore(
        Network(ns_iproute(veth.netns), NetworkdFiles(network_dir)),
        Hostname(tmp_path, lambda _: None, lambda: "localhost"),
        Ntp(tmp_path / "timesyncd"),
        Registration(tmp_path / "registration"),
        roles=None,
        networkd=networkd,
    ), network_dir


def test_set_interface_makes_networkd_take_the_file(
    tmp_path: Path, veth: Veth, bus: PrivateBus
) -> None:
    setup, network_dir = core(tmp_path, veth, Networkd(bus_address(bus)))
    networkd = start_networkd(veth, network_dir, bus, tmp_path / "networkd.log")
    try:
        assert network_file_of(bus, veth.inner) == ""  # no file yet: unmanaged
        settings = {"method": "static", "addresses": ["192.0.2.10/24"], "dns": []}
        record = asyncio.run(setup.set_interface(veth.inner, settings, True))
        assert record["networkd"] == RELOADED
        wanted = f"/etc/systemd/network/10-secondsite-{veth.inner}.network"
        deadline = time.monotonic() + 10
        while network_file_of(bus, veth.inner) != wanted and time.monotonic() < deadline:
            time.sleep(0.1)
        assert network_file_of(bus, veth.inner) == wanted
    finally:
        networkd.kill()
        networkd.wait()
    # networkd gone: the change is still made, and the answer says the file waits.
    settings = {"method": "static", "addresses": ["192.0.2.11/24"], "dns": []}
    record = asyncio.run(setup.set_interface(veth.inner, settings, True))
    assert record["addresses"] == ["192.0.2.11/24"]
    assert record["networkd"] == (
        "systemd-networkd is not running: the file applies at the next boot"
    )


def test_no_bus_or_no_networkd_is_a_note(tmp_path: Path) -> None:
    assert Networkd("none").reload().endswith("the file applies at the next boot")
    note = Networkd(f"unix:path={tmp_path}/no-bus").reload()
    assert note.startswith("no system bus to reach systemd-networkd")
