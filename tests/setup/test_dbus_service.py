"""org.secondsite.Setup1 over a private system-like dbus-daemon with our policy file.

The core is real: netlink changes in a network namespace, files under a temporary
root. Roles are left out here (setupd without systemd's bus) — test_roles.py drives
them against a systemd instance; here only their refusal is checked. The bus lives in
a world-readable directory so probes running as other uids can reach its socket.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dbus
import dbus.bus
import pytest

from appliance.lab.bus import PrivateBus, start_private_bus
from appliance.setup.core import SetupCore
from appliance.setup.dbus_service import (
    BUS_NAME,
    GENERIC_FAILURE,
    INTERFACE,
    OBJECT_PATH,
    Setup1Server,
    contract_xml,
    serve_setup1,
)
from appliance.setup.firstboot import DONE, write_done
from appliance.setup.hostname import Hostname
from appliance.setup.journal import NO_JOURNAL, Journal
from appliance.setup.network import Network, NetworkdFiles
from appliance.setup.networkd import Networkd
from appliance.setup.registration import Registration
from appliance.setup.services import Services
from appliance.setup.setupstate import SetupState
from appliance.setup.time import Ntp
from tests.setup.conftest import Veth, ns_iproute

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "units" / "dbus-1"
POLICY = UNITS / "system.d" / "org.secondsite.Setup1.conf"
ACTIVATION = UNITS / "system-services" / "org.secondsite.Setup1.service"
ERR = "org.secondsite.Setup1.Error."
TEST_GROUP = "nogroup"  # the secondsite group does not exist on build machines
MEMBER = (65534, 65534)  # nobody:nogroup
OUTSIDER = (1, 1)  # daemon:daemon


class World:
    def __init__(self, root: Path, veth: Veth, bus: PrivateBus) -> None:
        self.root = root
        (root / "etc").mkdir()
        self.kernel_names: list[str] = []
        self.hostname = Hostname(root, self.kernel_names.append, lambda: "localhost")
        self.core = SetupCore(
            Network(ns_iproute(veth.netns), NetworkdFiles(root / "etc/systemd/network")),
            self.hostname,
            Ntp(root / "etc/systemd/timesyncd.conf.d"),
            Registration(root / "var/lib/secondsite/setup"),
            roles=None,
            services=Services(None, Journal(["journalctl", "--directory", str(root)])),
            networkd=Networkd(bus.address),  # no networkd on it: SetInterface says so
            setup_state=SetupState(root, root / "var/lib/secondsite/setup"),
        )


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-asyncio")
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


@pytest.fixture
def bus() -> Iterator[PrivateBus]:
    directory = Path(tempfile.mkdtemp(prefix="secondsite-setup-bus-"))
    directory.chmod(0o755)
    policy = directory / "policy" / POLICY.name
    policy.parent.mkdir()
    policy.write_text(POLICY.read_text().replace('group="secondsite"', f'group="{TEST_GROUP}"'))
    bus = start_private_bus(directory, [policy])
    yield bus
    bus.stop()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def world(tmp_path: Path, veth: Veth, bus: PrivateBus) -> World:
    return World(tmp_path, veth, bus)


@pytest.fixture
def server(
    world: World, loop: asyncio.AbstractEventLoop, bus: PrivateBus
) -> Iterator[Setup1Server]:
    handle = serve_setup1(world.core, loop, bus.address)
    yield handle
    handle.close()


@pytest.fixture
def call(server: Setup1Server, bus: PrivateBus) -> Iterator[Any]:
    connection = dbus.bus.BusConnection(bus.address)

    def invoke(method: str, signature: str = "", *args: Any, iface: str = INTERFACE) -> Any:
        return connection.call_blocking(
            BUS_NAME, OBJECT_PATH, iface, method, signature, list(args), timeout=10
        )

    yield invoke
    connection.close()


def error_name(fn: Any, *args: Any) -> tuple[str, str]:
    with pytest.raises(dbus.DBusException) as info:
        fn(*args)
    return info.value.get_dbus_name(), info.value.get_dbus_message()


def settings(**values: Any) -> dbus.Dictionary:
    out = {}
    for key, value in values.items():
        out[key] = dbus.Array(value, signature="s") if isinstance(value, list) else value
    return dbus.Dictionary(out, signature="sv")


def test_network_round_trip_with_wire_types(call: Any, world: World) -> None:
    interfaces = call("GetNetwork")
    assert interfaces.signature == "a{sv}"
    eth1 = next(i for i in interfaces if i["name"] == "eth1")
    assert eth1["addresses"].signature == "s" and list(eth1["addresses"]) == []
    assert isinstance(eth1["up"], dbus.Boolean) and "gateway" not in eth1
    result = call(
        "SetInterface", "sa{sv}b", "eth1",
        settings(method="static", addresses=["192.0.2.10/24"], gateway="192.0.2.1",
                 dns=["192.0.2.53"]),
        False,
    )  # fmt: skip
    assert list(result["addresses"]) == ["192.0.2.10/24"]
    assert result["gateway"] == "192.0.2.1" and result["method"] == "static"
    assert bool(result["management"]) is True
    assert (
        result["networkd"] == "systemd-networkd is not running: the file applies at the next boot"
    )
    assert (world.root / "etc/systemd/network/10-secondsite-eth1.network").exists()
    assert call("Get", "ss", INTERFACE, "ManagementInterface",
                iface="org.freedesktop.DBus.Properties") == "eth1"  # fmt: skip
    name, message = error_name(
        call, "SetInterface", "sa{sv}b", "eth1", settings(method="dhcp"), False
    )
    assert name == ERR + "NeedsConfirmation" and "management interface" in message
    call("SetInterface", "sa{sv}b", "eth1", settings(method="dhcp"), True)


def test_named_errors_for_bad_input(call: Any) -> None:
    cases: list[tuple[str, str, tuple[Any, ...], str]] = [
        ("SetInterface", "sa{sv}b", ("eth9", settings(method="dhcp"), False), "NotFound"),
        ("SetInterface", "sa{sv}b", ("eth1", settings(method="static",
         addresses=["192.0.2.10"]), False), "InvalidArgument"),
        ("SetInterface", "sa{sv}b", ("../x", settings(method="dhcp"), False), "InvalidArgument"),
        ("SetHostname", "s", ("not_a_host",), "InvalidArgument"),
        ("SetHostname", "s", ("x" * 5000,), "InvalidArgument"),
        ("SetNtp", "as", (["ntp..example"],), "InvalidArgument"),
        ("Register", "ss", ("config:99999", "secret"), "InvalidArgument"),
        ("Register", "ss", ("config", "two\nlines"), "InvalidArgument"),
        ("SetRoles", "as", (["config"],), "Failed"),  # no systemd bus in this world
        ("GetRoles", "", (), "Failed"),
        ("StartUnit", "s", ("ssh.service",), "NotAllowed"),
        ("GetUnits", "", (), "Failed"),
        ("RestartUnit", "s", ("secondsite-setupd.service",), "NotAllowed"),
        ("StopUnit", "s", ("secondsite-processd.service",), "Failed"),  # no systemd bus
        ("GetUnitJournal", "su", ("ssh.service", 10), "NotAllowed"),
        ("GetUnitJournal", "su", ("secondsite-processd.service", 0), "InvalidArgument"),
        ("GetUnitJournal", "su", ("secondsite-processd.service", 10**6), "InvalidArgument"),
    ]  # fmt: skip
    for method, signature, args, expected in cases:
        name, message = error_name(call, method, signature, *args)
        assert name == ERR + expected, (method, args, name, message)
        assert "Traceback" not in message


def test_hostname_ntp_registration(call: Any, world: World) -> None:
    assert call("GetHostname") == "localhost"
    call("SetHostname", "s", "DR-Appliance.example.com")
    assert call("GetHostname") == "dr-appliance.example.com"
    assert world.kernel_names == ["dr-appliance.example.com"]
    assert call("GetNtp") == dbus.Array([], signature="s")
    call("SetNtp", "as", dbus.Array(["pool.ntp.org", "192.0.2.123"], signature="s"))
    assert list(call("GetNtp")) == ["pool.ntp.org", "192.0.2.123"]
    registered = call("Register", "ss", "config.dr.example", "correct horse")
    # No systemd's bus here: stored, nothing to enrol.
    assert registered == {"config_server": "config.dr.example:9440", "roles": {}}
    props = call("GetAll", "s", INTERFACE, iface="org.freedesktop.DBus.Properties")
    assert props["ConfigServer"] == "config.dr.example:9440"
    assert props["Hostname"] == "dr-appliance.example.com"
    assert set(props) == {"Version", "Hostname", "ManagementInterface", "ConfigServer"}


def test_unit_journal_without_a_journal(call: Any) -> None:
    result = call("GetUnitJournal", "su", "secondsite-processd.service", dbus.UInt32(20))
    assert result["unit"] == "secondsite-processd.service"
    assert isinstance(result["available"], dbus.Boolean) and not result["available"]
    assert result["note"] == NO_JOURNAL
    assert result["lines"].signature == "a{sv}" and list(result["lines"]) == []


def test_first_boot_marker_and_the_wizards(call: Any, world: World) -> None:
    state = call("GetFirstBoot")
    assert state == {"firstboot_done": False, "applied": [], "wizard_done": False}
    assert state["applied"].signature == "s"
    write_done(world.root / DONE, ["hostname", "network"])  # as secondsite-firstboot does
    assert call("GetFirstBoot") == {
        "firstboot_done": True, "applied": ["hostname", "network"], "wizard_done": False,
    }  # fmt: skip
    call("FinishSetup")
    assert bool(call("GetFirstBoot")["wizard_done"]) is True
    marker = world.root / "var/lib/secondsite/setup/setup.done"
    assert marker.stat().st_mode & 0o777 == 0o600


def test_a_bug_is_generic_failed_and_logged(
    call: Any, world: World, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> str:
        raise ZeroDivisionError("a bug")

    world.hostname.get = broken  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR):
        assert error_name(call, "GetHostname") == (ERR + "Failed", GENERIC_FAILURE)
    assert [r.exc_info[0] for r in caplog.records if r.exc_info] == [ZeroDivisionError]


def test_wrong_signatures_are_invalid_args(call: Any) -> None:
    for method, signature, args in [
        ("SetHostname", "i", (3,)),
        ("SetInterface", "sa{sv}", ("eth1", settings(method="dhcp"))),
        ("SetNtp", "s", ("pool.ntp.org",)),
    ]:
        name, _ = error_name(call, method, signature, *args)
        assert name == "org.freedesktop.DBus.Error.InvalidArgs", method


def test_changed_signal(server: Setup1Server, bus: PrivateBus, call: Any) -> None:
    received: queue.Queue[str] = queue.Queue()

    def listen() -> Any:
        connection = dbus.bus.BusConnection(bus.address, mainloop=server.glib.mainloop)
        connection.add_signal_receiver(
            lambda what: received.put(str(what)), "Changed", INTERFACE, path=OBJECT_PATH
        )
        return connection

    listener = server.glib.call(listen)
    try:
        call("SetHostname", "s", "dr01")
        call("SetNtp", "as", dbus.Array([], signature="s"))
        assert [received.get(timeout=10) for _ in range(2)] == ["hostname", "ntp"]
    finally:
        server.glib.call(listener.close)


def _interface(xml: str) -> dict[str, Any]:
    node = ET.fromstring(xml).find(f"interface[@name='{INTERFACE}']")
    assert node is not None
    # dbus-python names no out arguments: those are compared by type.
    methods = {
        m.get("name"): [
            (a.get("name") if a.get("direction", "in") == "in" else None, a.get("type"))
            for a in m.iter("arg")
        ]
        for m in node.iter("method")
    }
    signals = {s.get("name"): [a.get("type") for a in s.iter("arg")] for s in node.iter("signal")}
    props = {p.get("name"): (p.get("type"), p.get("access")) for p in node.iter("property")}
    return {"methods": methods, "signals": signals, "properties": props}


def test_live_introspection_matches_the_contract(call: Any) -> None:
    live = call("Introspect", iface="org.freedesktop.DBus.Introspectable")
    assert _interface(live) == _interface(contract_xml())


_PROBE = """
import json, os, sys
import dbus, dbus.bus
uid, gid = int(sys.argv[1]), int(sys.argv[2])
os.setgroups([gid]); os.setgid(gid); os.setuid(uid)
c = dbus.bus.BusConnection(os.environ["BUS"])
out = {}
for method, sig, args, iface in json.loads(sys.argv[3]):
    try:
        c.call_blocking("org.secondsite.Setup1", "/org/secondsite/Setup1", iface, method,
                        sig, args, timeout=10)
        out[method] = "ok"
    except dbus.DBusException as exc:
        out[method] = exc.get_dbus_name()
print(json.dumps(out))
"""

_CALLS = [
    ["GetNetwork", "", [], INTERFACE],
    ["GetHostname", "", [], INTERFACE],
    ["SetNtp", "as", [["pool.ntp.org"]], INTERFACE],
    ["GetUnitJournal", "su", ["secondsite-processd.service", 5], INTERFACE],
    ["GetAll", "s", [INTERFACE], "org.freedesktop.DBus.Properties"],
    ["Introspect", "", [], "org.freedesktop.DBus.Introspectable"],
]


def probe(bus: PrivateBus, who: tuple[int, int]) -> dict[str, str]:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(who[0]), str(who[1]), json.dumps(_CALLS)],
        env={**os.environ, "BUS": bus.address},
        capture_output=True, text=True, timeout=60, check=False, cwd="/",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result: dict[str, str] = json.loads(done.stdout)
    return result


def test_policy_member_allowed_outsider_refused(server: Setup1Server, bus: PrivateBus) -> None:
    assert set(probe(bus, MEMBER).values()) == {"ok"}
    assert set(probe(bus, OUTSIDER).values()) == {"org.freedesktop.DBus.Error.AccessDenied"}


def test_only_root_may_own_the_name(
    world: World, loop: asyncio.AbstractEventLoop, bus: PrivateBus
) -> None:
    policy = ET.fromstring(POLICY.read_text())
    owners = [p.get("user") for p in policy.iter("policy") if p.find("allow[@own]") is not None]
    assert owners == ["root"]
    handle = serve_setup1(world.core, loop, bus.address)  # root here: allowed
    handle.close()


def test_activation_file_names_the_unit() -> None:
    lines = dict(line.split("=", 1) for line in ACTIVATION.read_text().splitlines() if "=" in line)
    assert lines["Name"] == BUS_NAME
    assert lines["SystemdService"] == "secondsite-setupd.service"
    unit = (REPO / "units" / "secondsite-setupd.service").read_text()
    assert f"BusName={BUS_NAME}" in unit and "Type=dbus" in unit


def test_daemon_serves_then_exits_when_idle(bus: PrivateBus, tmp_path: Path) -> None:
    (tmp_path / "root/etc").mkdir(parents=True)
    argv = [
        str(Path(sys.prefix) / "bin" / "secondsite-setupd"),
        "--bus", bus.address, "--root", str(tmp_path / "root"),
        "--state-dir", str(tmp_path / "state"), "--systemd-bus", "none", "--idle-exit", "2",
    ]  # fmt: skip
    daemon = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    connection = dbus.bus.BusConnection(bus.address)
    try:
        for _ in range(100):
            if connection.name_has_owner(BUS_NAME):
                break
            time.sleep(0.1)
        hostname = connection.call_blocking(
            BUS_NAME, OBJECT_PATH, INTERFACE, "GetHostname", "", [], timeout=10
        )
        assert hostname
        assert daemon.wait(15) == 0  # idle for 2 s: gone
        assert not connection.name_has_owner(BUS_NAME)
    finally:
        connection.close()
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
