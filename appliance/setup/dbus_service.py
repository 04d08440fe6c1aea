"""org.secondsite.Setup1 on the system bus: a thin translation to `SetupCore`.

The contract is `org.secondsite.Setup1.xml` beside this file; a test compares the
live introspection with it. Methods run the core's coroutines on the asyncio loop
through `CallBridge` (the same pattern as Config1). A `SetupError` leaf becomes
`org.secondsite.Setup1.Error.<dbus_name>`; anything else is a bug, logged once with
its traceback and answered with the generic `Failed`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import dbus
import dbus.bus
import dbus.service

from appliance.dbus.bridge import (
    CallBridge,
    ErrorReply,
    Reply,
    from_dbus,
    to_dbus_value,
)
from appliance.dbus.glib import GLibThread
from appliance.dbus.service import (
    ASYNC,
    Contract,
    ContractObject,
    ServedObject,
    ServeError,
    error_mapper,
    serve,
)
from appliance.setup.core import Changed as ChangeEvent
from appliance.setup.core import SetupCore, Summary
from appliance.setup.errors import InvalidArgument, SetupError

_log = logging.getLogger(__name__)
__all__ = ["ServeError", "Setup1", "Setup1Server", "contract_xml", "map_error", "serve_setup1"]

BUS_NAME = "org.secondsite.Setup1"
OBJECT_PATH = "/org/secondsite/Setup1"
INTERFACE = "org.secondsite.Setup1"
ERROR_PREFIX = "org.secondsite.Setup1.Error."
CONTRACT = "org.secondsite.Setup1.xml"
GENERIC_FAILURE = "internal error; see the journal of secondsite-setupd"
MAX_ARG_CHARS = 4096
# Record keys that are always string lists: sent as `as` even when empty (the bridge
# would send an empty list as aa{sv}).
STRING_LISTS = frozenset({"addresses", "dns", "applied"})

_ASYNC = ASYNC
CONTRACT_OF = Contract("appliance.setup", CONTRACT, INTERFACE)
map_error = error_mapper(
    ERROR_PREFIX, SetupError, "the setup service is shutting down", GENERIC_FAILURE, _log
)


def contract_xml() -> str:
    return CONTRACT_OF.xml()


def _arg(value: str, what: str) -> str:
    if len(value) > MAX_ARG_CHARS:
        raise InvalidArgument(f"{what} is longer than {MAX_ARG_CHARS} characters")
    return str(value)


def _strings(values: list[Any], what: str) -> list[str]:
    if len(values) > 64:
        raise InvalidArgument(f"too many {what}")
    return [_arg(v, what) for v in values]


def _record(record: dict[str, Any]) -> dbus.Dictionary:
    out = {}
    for key, value in record.items():
        if value is None:
            continue
        if key in STRING_LISTS:
            out[dbus.String(key)] = dbus.Array([dbus.String(v) for v in value], signature="s")
        elif isinstance(value, dict):
            out[dbus.String(key)] = _record(value)
        else:
            out[dbus.String(key)] = to_dbus_value(value)
    return dbus.Dictionary(out, signature="sv")


def _one_record(record: dict[str, Any]) -> tuple[Any, ...]:
    return (_record(record),)


def _records(records: list[dict[str, Any]]) -> tuple[Any, ...]:
    return (dbus.Array([_record(r) for r in records], signature="a{sv}"),)


def _string(value: str) -> tuple[Any, ...]:
    return (dbus.String(value),)


def _string_list(values: list[str]) -> tuple[Any, ...]:
    return (dbus.Array([dbus.String(v) for v in values], signature="s"),)


def _none(_value: object) -> tuple[Any, ...]:
    return ()


def _summary_properties(summary: Summary) -> dict[str, Any]:
    return {
        "Version": dbus.String(summary.version),
        "Hostname": dbus.String(summary.hostname),
        "ManagementInterface": dbus.String(summary.management_interface),
        "ConfigServer": dbus.String(summary.config_server),
    }


class Setup1(ContractObject):
    """The org.secondsite.Setup1 object; methods delegate to a `SetupCore`."""

    contract = CONTRACT_OF
    read_only_hint = "; use the Set* methods"

    def __init__(self, core: SetupCore, bridge: CallBridge, glib: GLibThread) -> None:
        super().__init__(bridge, glib)
        self._core = core
        self.last_call = time.monotonic()  # read by the daemon's idle exit

    def _submit(
        self, reply: Reply, error: ErrorReply, work: Callable[[], Any], out: Callable[[Any], Any]
    ) -> None:
        self.last_call = time.monotonic()
        super()._submit(reply, error, work, out)

    @dbus.service.method(INTERFACE, in_signature="", out_signature="aa{sv}", **_ASYNC)
    def GetNetwork(self, reply: Reply, error: ErrorReply) -> None:
        self._submit(reply, error, self._core.network, _records)

    @dbus.service.method(INTERFACE, in_signature="sa{sv}b", out_signature="a{sv}", **_ASYNC)
    def SetInterface(
        self, name: str, settings: dict[Any, Any], confirm: bool, reply: Reply, error: ErrorReply
    ) -> None:
        work = lambda: self._core.set_interface(  # noqa: E731
            _arg(name, "interface name"), from_dbus(settings), bool(confirm)
        )
        self._submit(reply, error, work, _one_record)

    @dbus.service.method(INTERFACE, in_signature="", out_signature="s", **_ASYNC)
    def GetHostname(self, reply: Reply, error: ErrorReply) -> None:
        self._submit(reply, error, self._core.hostname, _string)

    @dbus.service.method(INTERFACE, in_signature="s", out_signature="", **_ASYNC)
    def SetHostname(self, hostname: str, reply: Reply, error: ErrorReply) -> None:
        work = lambda: self._core.set_hostname(_arg(hostname, "hostname"))  # noqa: E731
        self._submit(reply, error, work, _none)

    @dbus.service.method(INTERFACE, in_signature="", out_signature="as", **_ASYNC)
    def GetNtp(self, reply: Reply, error: ErrorReply) -> None:
        self._submit(reply, error, self._core.ntp, _string_list)

    @dbus.service.method(INTERFACE, in_signature="as", out_signature="", **_ASYNC)
    def SetNtp(self, servers: list[str], reply: Reply, error: ErrorReply) -> None:
        work = lambda: self._core.set_ntp(_strings(servers, "NTP servers"))  # noqa: E731
        self._submit(reply, error, work, _none)

    @dbus.service.method(INTERFACE, in_signature="", out_signature="a{sv}", **_ASYNC)
    def GetRoles(self, reply: Reply, error: ErrorReply) -> None:
        self._submit(reply, error, self._core.roles, _one_record)

    @dbus.service.method(INTERFACE, in_signature="as", out_signature="a{sv}", **_ASYNC)
    def SetRoles(self, roles: list[str], reply: Reply, error: ErrorReply) -> None:
        work = lambda: self._core.set_roles(_strings(roles, "roles"))  # noqa: E731
        self._submit(reply, error, work, _one_record)

    @dbus.service.method(INTERFACE, in_signature="ss", out_signature="a{sv}", **_ASYNC)
    def Register(self, address: str, passphrase: str, reply: Reply, error: ErrorReply) -> None:
        work = lambda: self._core.register(  # noqa: E731
            _arg(address, "address"), _arg(passphrase, "passphrase")
        )
        self._submit(reply, error, work, _one_record)

    @dbus.service.method(INTERFACE, in_signature="", out_signature="a{sv}", **_ASYNC)
    def Enrol(self, reply: Reply, error: ErrorReply) -> None:
        self._submit(reply, error, self._core.enrol, _one_record)

    @dbus.service.method(INTERFACE, in_signature="", out_signature="a{sv}", **_ASYNC)
    def GetFirstBoot(self, reply: Reply, error: ErrorReply) -> None:
        self._submit(reply, error, self._core.first_boot, _one_record)

    @dbus.service.method(INTERFACE, in_signature="", out_signature="", **_ASYNC)
    def FinishSetup(self, reply: Reply, error: ErrorReply) -> None:
        self._submit(reply, error, self._core.finish_setup, _none)

    # -- the appliance's units -------------------------------------------------------------

    @dbus.service.method(INTERFACE, in_signature="", out_signature="aa{sv}", **_ASYNC)
    def GetUnits(self, reply: Reply, error: ErrorReply) -> None:
        self._submit(reply, error, self._core.units, _records)

    def _control(self, action: str, unit: str, reply: Reply, error: ErrorReply) -> None:
        work = lambda: self._core.control_unit(action, _arg(unit, "unit"))  # noqa: E731
        self._submit(reply, error, work, _one_record)

    @dbus.service.method(INTERFACE, in_signature="s", out_signature="a{sv}", **_ASYNC)
    def StartUnit(self, unit: str, reply: Reply, error: ErrorReply) -> None:
        self._control("start", unit, reply, error)

    @dbus.service.method(INTERFACE, in_signature="s", out_signature="a{sv}", **_ASYNC)
    def StopUnit(self, unit: str, reply: Reply, error: ErrorReply) -> None:
        self._control("stop", unit, reply, error)

    @dbus.service.method(INTERFACE, in_signature="s", out_signature="a{sv}", **_ASYNC)
    def RestartUnit(self, unit: str, reply: Reply, error: ErrorReply) -> None:
        self._control("restart", unit, reply, error)

    @dbus.service.method(INTERFACE, in_signature="su", out_signature="a{sv}", **_ASYNC)
    def GetUnitJournal(self, unit: str, lines: int, reply: Reply, error: ErrorReply) -> None:
        work = lambda: self._core.unit_journal(_arg(unit, "unit"), int(lines))  # noqa: E731
        self._submit(reply, error, work, _one_record)

    # -- properties (read-only) ----------------------------------------------------------

    async def _properties(self) -> dict[str, Any]:
        return _summary_properties(await self._core.summary())

    # -- signals ---------------------------------------------------------------------------

    @dbus.service.signal(INTERFACE, signature="s")
    def Changed(self, what: str) -> None:
        """Something setup manages changed."""

    def notify(self, change: ChangeEvent) -> None:
        """The `SetupCore.subscribe` listener: called on the loop, emits on GLib."""
        self._glib.call_soon(partial(self.Changed, dbus.String(change.what)))


class Setup1Server(ServedObject):
    """The handle `serve_setup1` returns: `close()` takes the service off the bus."""

    def idle_seconds(self) -> float:
        return time.monotonic() - self.obj.last_call


def serve_setup1(
    core: SetupCore, loop: asyncio.AbstractEventLoop, bus_address: str | None = None
) -> Setup1Server:
    """Put `core` on the bus as org.secondsite.Setup1 (None: the system bus).

    Call on `loop`'s thread or before it runs (it subscribes to `core`). Raises
    ServeError when the bus is unreachable or the name cannot be owned.
    """

    def subscribe(obj: ContractObject) -> Callable[[], None]:
        assert isinstance(obj, Setup1)
        return core.subscribe(obj.notify)

    return Setup1Server(*serve(
        bus_name=BUS_NAME, object_path=OBJECT_PATH, thread_name="setupd-dbus",
        make=lambda bridge, glib: Setup1(core, bridge, glib), subscribe=subscribe,
        map_error=map_error, loop=loop, bus_address=bus_address,
        policy_hint="is org.secondsite.Setup1.conf installed in /usr/share/dbus-1/system.d, "
        "and does setupd run as root?",
    ))  # fmt: skip
