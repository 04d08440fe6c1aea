"""org.secondsite.Config1 over a private system-like dbus-daemon with our policy file.

The core (ConfigService) is replaced by `FakeConfig`, an in-memory ConfigApi: it is
a dependency of the unit under test (the D-Bus front end), which runs for real —
dbus-daemon, policy, GLib thread, asyncio loop. The bus lives in a world-readable
temporary directory (not pytest's 0700 tmp_path) so clients that dropped to other
uids can reach its socket.
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
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import dbus
import dbus.bus
import dbus.mainloop.glib
import pytest

from appliance.config import errors
from appliance.config.api import (
    AlertChanged,
    JobProgress,
    MachineStateChanged,
    Record,
    Signal,
    Summary,
)
from appliance.config.dbus_service import (
    BUS_NAME,
    GENERIC_FAILURE,
    INTERFACE,
    OBJECT_PATH,
    Config1Server,
    ServeError,
    contract_xml,
    serve_config1,
)
from appliance.dbus.client import ACCESS_DENIED, SERVICE_UNKNOWN, Config1Client, DBusCallError
from appliance.lab.bus import PrivateBus, start_private_bus

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[2]
POLICY = REPO / "units" / "dbus-1" / "system.d" / "org.secondsite.Config1.conf"
ERR = "org.secondsite.Config1.Error."
# The secondsite group does not exist on build machines: policy tests use a copy of
# the policy file naming `nogroup` (nobody's group) instead; `daemon` is a non-member.
TEST_GROUP = "nogroup"
MEMBER = (65534, 65534)  # nobody:nogroup
OUTSIDER = (1, 1)  # daemon:daemon

MACHINE: Record = {
    "name": "web01",
    "state": "protected",
    "protected": True,
    "disk_count": 2,
    "rpo_seconds": 12.5,
    "last_point": None,  # unknown: left out on D-Bus
    "tags": ["prod", "eu"],
    "disks": [
        {"device": "/dev/sda", "size": 10 * 2**30, "excluded": False},
        {"device": "/dev/sdb", "size": 2**40, "excluded": True, "label": None},
    ],
}


def plain(record: Any) -> Any:
    """What a client should see: the record without its None values."""
    if isinstance(record, dict):
        return {k: plain(v) for k, v in record.items() if v is not None}
    if isinstance(record, list):
        return [plain(v) for v in record]
    return record


class FakeConfig:
    """An in-memory ConfigApi (a stand-in for ConfigService while it is written)."""

    def __init__(self) -> None:
        self.machines_by_name: dict[str, Record] = {"web01": dict(MACHINE)}
        self.policies_by_name: dict[str, Record] = {"default": {"name": "default", "rpo": 60}}
        self.calls: list[tuple[str, Any]] = []
        self.listeners: list[Callable[[Signal], None]] = []
        self.bug = False
        self.slow_started = threading.Event()

    def _machine(self, machine: str) -> Record:
        if self.bug:
            raise ZeroDivisionError("a bug in the core")
        if machine not in self.machines_by_name:
            raise errors.NotFound(f"no machine {machine!r}")
        return self.machines_by_name[machine]

    async def status(self) -> Record:
        return {"machines": 1, "worst_rpo_seconds": 12.5, "servers": [{"name": "ps1"}]}

    async def machines(self) -> list[Record]:
        if self.bug:
            raise ZeroDivisionError("a bug in the core")
        return list(self.machines_by_name.values())

    async def machine(self, machine: str) -> Record:
        return self._machine(machine)

    async def disks(self, machine: str) -> list[Record]:
        return list(self._machine(machine)["disks"])

    async def points(self, machine: str) -> list[Record]:
        self._machine(machine)
        return []

    async def servers(self) -> list[Record]:
        return [{"name": "ps1", "role": "process", "online": True}]

    async def jobs(self, include_finished: bool) -> list[Record]:
        self.calls.append(("jobs", include_finished))
        return [{"id": "j1", "percent": 50.0}]

    async def job(self, job: str) -> Record:
        if job == "slow":
            self.slow_started.set()
            await asyncio.Event().wait()  # until cancelled
        if job != "j1":
            raise errors.NotFound(f"no job {job!r}")
        return {"id": "j1", "percent": 50.0}

    async def alerts(self, include_cleared: bool) -> list[Record]:
        self.calls.append(("alerts", include_cleared))
        return [{"id": "a1", "active": True}]

    async def events(self, limit: int) -> list[Record]:
        self.calls.append(("events", limit))
        return [{"seq": i, "time": 1.5} for i in range(min(limit, 3))]

    async def policies(self) -> list[Record]:
        return list(self.policies_by_name.values())

    async def set_policy(self, name: str, settings: Record) -> Record:
        unknown = set(settings) - {"rpo", "compress", "retention", "windows"}
        if unknown:
            raise errors.InvalidArgument(f"unknown keys: {sorted(unknown)}")
        record = {"name": name, **settings}
        self.policies_by_name[name] = record
        return record

    async def assign_policy(self, machine: str, policy: str) -> None:
        self._machine(machine)
        self.calls.append(("assign_policy", (machine, policy)))

    async def protect(self, machine: str, policy: str | None) -> str:
        self._machine(machine)
        self.calls.append(("protect", (machine, policy)))
        return "job-protect"

    async def unprotect(self, machine: str) -> str:
        if machine == "busy":
            raise errors.Conflict("a job is already running for busy")
        self._machine(machine)
        return "job-unprotect"

    async def resync(self, machine: str) -> str:
        self._machine(machine)
        return "job-resync"

    async def passphrase(self, rotate: bool) -> Record:
        return {"passphrase": "rotated" if rotate else "secret", "expires": 99.0}

    async def revoke(self, name: str) -> None:
        self.calls.append(("revoke", name))

    async def set_replica(self, machine: str, settings: Record) -> Record:
        self._machine(machine)
        return settings

    async def vcenter_list(self) -> list[Record]:
        return [{"name": "vc-dr", "address": "vc:443", "site": "dr"}]

    async def register_vcenter(
        self, name: str, *, site: str, address: str, user: str, password: str, thumbprint: str
    ) -> Record:
        if not thumbprint:
            raise errors.InvalidArgument("confirm the thumbprint AA:BB")
        self.calls.append(("register_vcenter", (name, site, address, user)))
        return {"name": name, "address": address, "site": site, "thumbprint": thumbprint}

    async def test_failover(self, machine: str, point: str, network_map: Record | None) -> str:
        self._machine(machine)
        self.calls.append(("test_failover", (machine, point, network_map)))
        return "job-tfo"

    async def cleanup(self, machine: str) -> str:
        self._machine(machine)
        return "job-cleanup"

    async def failover(self, machine: str, point: str, mode: str) -> str:
        self._machine(machine)
        self.calls.append(("failover", (machine, point, mode)))
        return "job-failover"

    async def commit(self, machine: str) -> str:
        self._machine(machine)
        return "job-commit"

    async def cancel(self, machine: str) -> str:
        self._machine(machine)
        return "job-cancel"

    async def failback(self, machine: str) -> str:
        self._machine(machine)
        return "job-failback"

    async def set_plan(self, name: str, spec: Record) -> Record:
        self.calls.append(("set_plan", (name, spec)))
        return {"name": name, "spec": spec}

    async def plans(self) -> list[Record]:
        return [{"name": "erp", "spec": {"groups": [{"machines": ["web01"], "wait_s": 0.0}]}}]

    async def plan_test_failover(self, name: str, point: str) -> str:
        self.calls.append(("plan_test_failover", (name, point)))
        return "job-plan-tfo"

    async def plan_cleanup(self, name: str) -> str:
        return "job-plan-cleanup"

    async def plan_failover(self, name: str, point: str, mode: str) -> str:
        self.calls.append(("plan_failover", (name, point, mode)))
        return "job-plan-failover"

    async def push_install(self, host: str, options: Record) -> str:
        self.calls.append(("push_install", (host, options)))
        return "job-push"

    async def push_uninstall(self, host: str, options: Record) -> str:
        self.calls.append(("push_uninstall", (host, options)))
        return "job-push-uninstall"

    def summary(self) -> Summary:
        return Summary("1.2.3", 3, 2, 1, 4, -1.0)

    def subscribe(self, listener: Callable[[Signal], None]) -> Callable[[], None]:
        self.listeners.append(listener)
        return lambda: self.listeners.remove(listener)

    def emit(self, signal: Signal) -> None:
        for listener in list(self.listeners):
            listener(signal)


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
def bus_dir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="secondsite-bus-"))
    directory.chmod(0o755)  # other uids must reach the socket
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def start_bus(directory: Path, group: str | None = TEST_GROUP) -> PrivateBus:
    """A bus with our policy file (the group renamed), or with no policy if group is None."""
    if group is None:
        return start_private_bus(directory)
    policy = directory / "policy" / POLICY.name
    policy.parent.mkdir()
    policy.write_text(POLICY.read_text().replace('group="secondsite"', f'group="{group}"'))
    return start_private_bus(directory, [policy])


@pytest.fixture
def bus(bus_dir: Path) -> Iterator[PrivateBus]:
    bus = start_bus(bus_dir)
    yield bus
    bus.stop()


@pytest.fixture
def api() -> FakeConfig:
    return FakeConfig()


@pytest.fixture
def server(
    api: FakeConfig, loop: asyncio.AbstractEventLoop, bus: PrivateBus
) -> Iterator[Config1Server]:
    handle = serve_config1(api, loop, bus.address)
    yield handle
    handle.close()


@pytest.fixture
def client(server: Config1Server, bus: PrivateBus) -> Iterator[Config1Client]:
    with Config1Client(bus.address, timeout=10) as client:
        yield client


@pytest.fixture
def raw(server: Config1Server, bus: PrivateBus) -> Iterator[Any]:
    """A plain dbus-python proxy, to send exactly the types a test chooses."""
    connection = dbus.bus.BusConnection(bus.address)
    yield connection.get_object(BUS_NAME, OBJECT_PATH, introspect=False)
    connection.close()


def raw_call(
    proxy: Any, method: str, *args: Any, signature: str = "", iface: str = INTERFACE
) -> Any:
    return proxy.get_dbus_method(method, iface)(*args, signature=signature, timeout=10)


def error_of(call: Callable[[], Any]) -> tuple[str, str]:
    with pytest.raises(DBusCallError) as info:
        call()
    return info.value.name, info.value.message


# -- every method, round trip ------------------------------------------------------


def test_reads_round_trip_plain_python(client: Config1Client, api: FakeConfig) -> None:
    assert client.call("Status") == {
        "machines": 1,
        "worst_rpo_seconds": 12.5,
        "servers": [{"name": "ps1"}],
    }
    machines = client.call("ListMachines")
    assert machines == [plain(MACHINE)]
    assert "last_point" not in machines[0]
    assert type(machines[0]["protected"]) is bool
    assert type(machines[0]["disk_count"]) is int
    assert type(machines[0]["rpo_seconds"]) is float
    assert client.call("GetMachine", "web01") == plain(MACHINE)
    assert client.call("ListDisks", "web01") == plain(MACHINE["disks"])
    assert client.call("ListPoints", "web01") == []
    assert client.call("ListServers") == [{"name": "ps1", "role": "process", "online": True}]
    assert client.call("ListJobs", True) == [{"id": "j1", "percent": 50.0}]
    assert client.call("GetJob", "j1") == {"id": "j1", "percent": 50.0}
    assert client.call("ListAlerts", False) == [{"id": "a1", "active": True}]
    assert client.call("ListEvents", 2) == [{"seq": 0, "time": 1.5}, {"seq": 1, "time": 1.5}]
    assert client.call("ListPolicies") == [{"name": "default", "rpo": 60}]
    assert ("jobs", True) in api.calls
    assert ("alerts", False) in api.calls
    assert ("events", 2) in api.calls


def test_changes_round_trip(client: Config1Client, api: FakeConfig) -> None:
    settings = {"rpo": 30, "compress": True, "retention": 7.5, "windows": [{"from": "22:00"}]}
    assert client.call("SetPolicy", "gold", settings) == {"name": "gold", **settings}
    assert api.policies_by_name["gold"] == {"name": "gold", **settings}
    assert type(api.policies_by_name["gold"]["rpo"]) is int
    assert client.call("AssignPolicy", "web01", "gold") is None
    assert client.call("Protect", "web01", "") == "job-protect"
    assert client.call("Protect", "web01", "gold") == "job-protect"
    assert ("protect", ("web01", None)) in api.calls  # "" means keep the policy
    assert ("protect", ("web01", "gold")) in api.calls
    assert client.call("Unprotect", "web01") == "job-unprotect"
    assert client.call("Resync", "web01") == "job-resync"
    assert client.call("GetPassphrase") == {"passphrase": "secret", "expires": 99.0}
    assert client.call("RotatePassphrase") == {"passphrase": "rotated", "expires": 99.0}
    assert client.call("Revoke", "web01") is None
    assert ("revoke", "web01") in api.calls
    assert client.call("TestFailover", "web01", "latest", {}) == "job-tfo"
    assert ("test_failover", ("web01", "latest", None)) in api.calls  # {}: isolated
    assert client.call("TestFailover", "web01", "", {"eth0": "VM Network"}) == "job-tfo"
    assert ("test_failover", ("web01", "", {"eth0": "VM Network"})) in api.calls
    assert client.call("Failover", "web01", "t-5", "planned") == "job-failover"
    assert ("failover", ("web01", "t-5", "planned")) in api.calls
    for method in ("Cleanup", "Commit", "Cancel", "Failback"):
        assert client.call(method, "web01") == f"job-{method.lower()}"
    assert client.call("SetReplica", "web01", {"cpus": 2}) == {"cpus": 2}
    assert client.call("ListVCenters") == [{"name": "vc-dr", "address": "vc:443", "site": "dr"}]
    spec = {"groups": [{"machines": ["web01", "db01"], "wait_s": 30, "pre": "true"}]}
    assert client.call("SetPlan", "erp", spec) == {"name": "erp", "spec": spec}
    assert ("set_plan", ("erp", spec)) in api.calls
    assert client.call("ListPlans")[0]["spec"]["groups"][0]["machines"] == ["web01"]
    assert client.call("PlanTestFailover", "erp", "latest") == "job-plan-tfo"
    assert ("plan_test_failover", ("erp", "latest")) in api.calls
    assert client.call("PlanCleanup", "erp") == "job-plan-cleanup"
    assert client.call("PlanFailover", "erp", "1700000000", "unplanned") == "job-plan-failover"
    assert ("plan_failover", ("erp", "1700000000", "unplanned")) in api.calls
    with pytest.raises(DBusCallError, match="confirm the thumbprint"):
        client.call("RegisterVCenter", "vc-dr", "dr", "vc:443", "u", "pw", "")
    record = client.call("RegisterVCenter", "vc-dr", "dr", "vc:443", "u", "pw", "AA:BB")
    assert record["thumbprint"] == "AA:BB" and "password" not in record
    options = {"key": "KEY", "disks": ["/dev/sdb"], "port": 2222}
    assert client.call("PushInstall", "src1", options) == "job-push"
    assert ("push_install", ("src1", options)) in api.calls
    options = {"password": "pw", "user": "admin"}
    assert client.call("PushUninstall", "src1", options) == "job-push-uninstall"
    assert ("push_uninstall", ("src1", options)) in api.calls


def test_wire_types_are_the_documented_ones(raw: Any) -> None:
    record = raw_call(raw, "GetMachine", "web01", signature="s")
    assert record.signature == "sv"
    assert isinstance(record["disk_count"], dbus.Int64)
    assert isinstance(record["rpo_seconds"], dbus.Double)
    assert isinstance(record["protected"], dbus.Boolean)
    assert isinstance(record["name"], dbus.String)
    assert record["tags"].signature == "s"
    assert record["disks"].signature == "a{sv}"
    assert isinstance(record["disks"][1]["size"], dbus.Int64)
    assert "label" not in record["disks"][1]
    listed = raw_call(raw, "ListMachines")
    assert listed.signature == "a{sv}"


# -- errors ------------------------------------------------------------------------


def test_core_errors_become_named_errors(client: Config1Client) -> None:
    assert error_of(lambda: client.call("GetMachine", "nope")) == (
        ERR + "NotFound",
        "no machine 'nope'",
    )
    assert error_of(lambda: client.call("GetJob", "j9"))[0] == ERR + "NotFound"
    name, message = error_of(lambda: client.call("SetPolicy", "p", {"colour": "red"}))
    assert (name, message) == (ERR + "InvalidArgument", "unknown keys: ['colour']")
    assert error_of(lambda: client.call("Unprotect", "busy")) == (
        ERR + "Conflict",
        "a job is already running for busy",
    )


def test_a_bug_is_failed_generic_and_logged_once(
    client: Config1Client, api: FakeConfig, caplog: pytest.LogCaptureFixture
) -> None:
    api.bug = True
    with caplog.at_level(logging.ERROR):
        assert error_of(lambda: client.call("ListMachines")) == (ERR + "Failed", GENERIC_FAILURE)
        assert error_of(lambda: client.call("GetMachine", "web01"))[1] == GENERIC_FAILURE
    logged = [r for r in caplog.records if r.exc_info and r.levelno >= logging.ERROR]
    assert len(logged) == 2  # once per failed call
    assert all(r.exc_info and r.exc_info[0] is ZeroDivisionError for r in logged)
    api.bug = False
    assert client.call("GetMachine", "web01") == plain(MACHINE)  # still serving


def test_unsendable_result_is_a_bug(client: Config1Client, api: FakeConfig) -> None:
    api.machines_by_name["web01"] = {"name": "web01", "blob": b"\x00"}
    assert error_of(lambda: client.call("GetMachine", "web01")) == (ERR + "Failed", GENERIC_FAILURE)


def test_wrong_argument_types_get_a_named_error(raw: Any) -> None:
    cases = [
        ("GetMachine", (42,), "i"),
        ("GetMachine", (), ""),
        ("GetMachine", ("a", "b"), "ss"),
        ("ListEvents", ("ten",), "s"),
        ("ListJobs", (1,), "u"),
        ("SetPolicy", ("p", {"rpo": "x"}), "sa{ss}"),
        ("Get", (INTERFACE,), "s"),
    ]
    for method, args, signature in cases:
        iface = "org.freedesktop.DBus.Properties" if method == "Get" else INTERFACE
        with pytest.raises(dbus.DBusException) as info:
            raw_call(raw, method, *args, signature=signature, iface=iface)
        assert info.value.get_dbus_name() == "org.freedesktop.DBus.Error.InvalidArgs", method
        assert "Traceback" not in info.value.get_dbus_message()


def test_oversized_names_are_invalid(client: Config1Client) -> None:
    long = "x" * 4097
    cases: list[tuple[str, tuple[Any, ...]]] = [
        ("GetMachine", (long,)),
        ("Protect", ("web01", long)),
        ("Revoke", (long,)),
        ("SetPolicy", ("p", {long: 1})),
    ]
    for method, args in cases:
        assert error_of(partial(client.call, method, *args))[0] == ERR + "InvalidArgument"
    assert error_of(lambda: client.call("GetMachine", "x" * 4096))[0] == ERR + "NotFound"


# -- properties, signals, introspection ------------------------------------------------


def test_properties(client: Config1Client, raw: Any) -> None:
    assert client.properties() == {
        "Version": "1.2.3",
        "Machines": 3,
        "ProtectedMachines": 2,
        "OpenAlerts": 1,
        "RunningJobs": 4,
        "WorstRpoSeconds": -1.0,
    }
    props = "org.freedesktop.DBus.Properties"
    machines = raw_call(raw, "Get", INTERFACE, "Machines", signature="ss", iface=props)
    assert isinstance(machines, dbus.UInt32)
    assert machines == 3
    for args, signature, expected in [
        ((INTERFACE, "Machines", dbus.UInt32(1, variant_level=1)), "ssv", "PropertyReadOnly"),
        ((INTERFACE, "Nope", dbus.UInt32(1, variant_level=1)), "ssv", "UnknownProperty"),
    ]:
        with pytest.raises(dbus.DBusException) as info:
            raw_call(raw, "Set", *args, signature=signature, iface=props)
        assert info.value.get_dbus_name() == "org.freedesktop.DBus.Error." + expected
    with pytest.raises(dbus.DBusException) as info:
        raw_call(raw, "Get", INTERFACE, "Nope", signature="ss", iface=props)
    assert info.value.get_dbus_name() == "org.freedesktop.DBus.Error.UnknownProperty"
    with pytest.raises(dbus.DBusException) as info:
        raw_call(raw, "GetAll", "org.example.Other", signature="s", iface=props)
    assert info.value.get_dbus_name() == "org.freedesktop.DBus.Error.UnknownInterface"


def test_signals_reach_a_client(
    server: Config1Server, bus: PrivateBus, api: FakeConfig, loop: asyncio.AbstractEventLoop
) -> None:
    # The server's GLib thread runs GLib's default context, which this connection's
    # main loop attaches to as well: it dispatches the receiver, and the connection is
    # made, used and closed on it (closing it from another thread while GLib
    # dispatches it can deadlock libdbus).
    received: queue.Queue[tuple[str, tuple[Any, ...]]] = queue.Queue()

    def listen() -> Any:
        connection = dbus.bus.BusConnection(bus.address, mainloop=server.glib.mainloop)
        connection.add_signal_receiver(
            lambda *args, member: received.put((member, args)),
            dbus_interface=INTERFACE,
            path=OBJECT_PATH,
            member_keyword="member",
        )
        return connection

    listener = server.glib.call(listen)
    try:
        signals: list[Signal] = [
            JobProgress("j1", "running", "copy", 42.5),
            AlertChanged("a1", "web01", "rpo", True, "RPO exceeded"),
            MachineStateChanged("web01", "protected"),
        ]
        for signal in signals:
            loop.call_soon_threadsafe(partial(api.emit, signal))
        got = [received.get(timeout=10) for _ in range(3)]
    finally:
        server.glib.call(listener.close)
    assert got == [
        ("JobProgress", ("j1", "running", "copy", 42.5)),
        ("AlertChanged", ("a1", "web01", "rpo", True, "RPO exceeded")),
        ("MachineStateChanged", ("web01", "protected")),
    ]
    assert isinstance(got[0][1][3], dbus.Double)
    assert isinstance(got[1][1][3], dbus.Boolean)


def _interface(xml: str) -> dict[str, Any]:
    """Methods (in args with names, out types), signals and properties of Config1."""
    node = ET.fromstring(xml).find(f"interface[@name='{INTERFACE}']")
    assert node is not None
    methods = {}
    for method in node.iter("method"):
        args = list(method.iter("arg"))
        ins = [(a.get("name"), a.get("type")) for a in args if a.get("direction", "in") == "in"]
        outs = [a.get("type") for a in args if a.get("direction") == "out"]
        methods[method.get("name")] = (ins, outs)
    signals = {
        s.get("name"): [(a.get("name"), a.get("type")) for a in s.iter("arg")]
        for s in node.iter("signal")
    }
    props = {p.get("name"): (p.get("type"), p.get("access")) for p in node.iter("property")}
    return {"methods": methods, "signals": signals, "properties": props}


def test_live_introspection_matches_the_contract(raw: Any) -> None:
    live = raw_call(raw, "Introspect", iface="org.freedesktop.DBus.Introspectable")
    assert _interface(live) == _interface(contract_xml())
    interfaces = {i.get("name") for i in ET.fromstring(live).iter("interface")}
    assert {"org.freedesktop.DBus.Properties", "org.freedesktop.DBus.Introspectable"} <= interfaces


# -- policy ------------------------------------------------------------------------

_PROBE = """
import json, os, sys
from appliance.dbus.client import Config1Client, DBusCallError
uid, gid = int(sys.argv[1]), int(sys.argv[2])
calls = json.loads(sys.argv[3])
os.setgroups([gid]); os.setgid(gid); os.setuid(uid)  # after the imports: /root is 0700
out = {}
with Config1Client(timeout=10) as client:
    for method, args in calls:
        try:
            client.properties() if method == "GetAll" else client.call(method, *args)
            out[method] = "ok"
        except DBusCallError as exc:
            out[method] = exc.name
print(json.dumps(out))
"""

_PROBE_CALLS = [
    ["Status", []],
    ["ListMachines", []],
    ["Protect", ["web01", ""]],
    ["SetPolicy", ["gold", {"rpo": 5}]],
    ["ListPlans", []],
    ["SetPlan", ["erp", {"groups": [{"machines": ["web01"]}]}]],
    ["PlanTestFailover", ["erp", "latest"]],
    ["PlanCleanup", ["erp"]],
    ["PlanFailover", ["erp", "", "planned"]],
    ["GetAll", []],
    ["GetPassphrase", []],
    ["RotatePassphrase", []],
    ["Revoke", ["web01"]],
    ["RegisterVCenter", ["vc", "dr", "vc:443", "u", "pw", "AA:BB"]],
    ["PushInstall", ["src1", {"key": "k", "disks": ["/dev/sdb"]}]],
    ["PushUninstall", ["src1", {"key": "k"}]],
]


def probe(bus: PrivateBus, who: tuple[int, int]) -> dict[str, str]:
    env = {**os.environ, "SECONDSITE_BUS_ADDRESS": bus.address, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(who[0]), str(who[1]), json.dumps(_PROBE_CALLS)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, str] = json.loads(done.stdout)
    return result


@pytest.mark.root
def test_policy_group_member_outsider_and_root(
    server: Config1Server, bus: PrivateBus, client: Config1Client
) -> None:
    member = probe(bus, MEMBER)
    # PushInstall/PushUninstall are open to the group: the console installs agents.
    root_only = {"GetPassphrase", "RotatePassphrase", "Revoke", "RegisterVCenter"}
    assert {m for m, r in member.items() if r == "ok"} == set(member) - root_only
    assert {member[m] for m in root_only} == {ACCESS_DENIED}
    assert set(probe(bus, OUTSIDER).values()) == {ACCESS_DENIED}
    assert client.call("GetPassphrase") == {"passphrase": "secret", "expires": 99.0}  # root


def test_policy_lists_every_contract_method() -> None:
    policy = ET.fromstring(POLICY.read_text())
    group = policy.find("policy[@group='secondsite']")
    assert group is not None
    allowed = {
        rule.get("send_member")
        for rule in group.iter("allow")
        if rule.get("send_interface") == INTERFACE
    }
    methods = set(_interface(contract_xml())["methods"])
    root_only = {"GetPassphrase", "RotatePassphrase", "Revoke", "RegisterVCenter",
                 "SetVCenterCredentials"}  # fmt: skip
    assert allowed == methods - root_only
    assert {"PushInstall", "PushUninstall"} <= allowed  # the console's install wizard


def test_unmodified_policy_loads(bus_dir: Path, api: FakeConfig, loop: Any) -> None:
    # The real file names a group this machine may not have; the bus must still start.
    bus = start_private_bus(bus_dir, [POLICY])
    try:
        handle = serve_config1(api, loop, bus.address)
        handle.close()
    finally:
        bus.stop()


# -- serving -----------------------------------------------------------------------


def test_serve_close_leaves_no_thread_and_frees_the_name(
    api: FakeConfig, loop: asyncio.AbstractEventLoop, bus: PrivateBus
) -> None:
    before = set(threading.enumerate())
    for _ in range(2):  # a second serve proves the name and the GLib thread were freed
        handle = serve_config1(api, loop, bus.address)
        with Config1Client(bus.address, timeout=10) as client:
            assert client.call("GetJob", "j1")["id"] == "j1"
        handle.close()
        handle.close()  # idempotent
        assert set(threading.enumerate()) == before
        assert api.listeners == []
    with Config1Client(bus.address, timeout=10) as client:
        assert error_of(lambda: client.call("Status"))[0] == SERVICE_UNKNOWN


def test_close_answers_calls_in_flight(
    api: FakeConfig, loop: asyncio.AbstractEventLoop, bus: PrivateBus
) -> None:
    handle = serve_config1(api, loop, bus.address)
    outcome: queue.Queue[tuple[str, str]] = queue.Queue()

    def slow_call() -> None:
        with Config1Client(bus.address, timeout=10) as client:
            outcome.put(error_of(lambda: client.call("GetJob", "slow")))

    caller = threading.Thread(target=slow_call)
    caller.start()
    assert api.slow_started.wait(10)
    handle.close()
    caller.join(15)
    assert outcome.get(timeout=1) == (ERR + "Failed", "the configuration server is shutting down")


def test_name_taken_or_refused_is_a_clear_error(
    api: FakeConfig, loop: asyncio.AbstractEventLoop, bus: PrivateBus, bus_dir: Path
) -> None:
    squatter = dbus.bus.BusConnection(bus.address)
    squatter.request_name(BUS_NAME)
    try:
        with pytest.raises(ServeError, match="another process already owns it"):
            serve_config1(api, loop, bus.address)
    finally:
        squatter.close()
    bare = start_bus(bus_dir / "bare", group=None)  # no policy file: root may not own it
    try:
        with pytest.raises(ServeError, match="AccessDenied"):
            serve_config1(api, loop, bare.address)
    finally:
        bare.stop()
    assert api.listeners == []
    assert not [t for t in threading.enumerate() if t.name == "configd-dbus"]
