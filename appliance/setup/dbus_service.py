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
import xml.etree.ElementTree as ET
from collections.abc import Callable
from functools import partial
from importlib import resources
from typing import Any

import dbus
import dbus.bus
import dbus.service

from appliance.dbus.bridge import (
    BridgeClosed,
    CallBridge,
    ErrorReply,
    Reply,
    SignatureCheckedObject,
    from_dbus,
    to_dbus_value,
)
from appliance.dbus.glib import GLibThread
from appliance.setup.core import Changed as ChangeEvent
from appliance.setup.core import SetupCore, Summary
from appliance.setup.errors import InvalidArgument, SetupError

_log = logging.getLogger(__name__)

BUS_NAME = "org.secondsite.Setup1"
OBJECT_PATH = "/org/secondsite/Setup1"
INTERFACE = "org.secondsite.Setup1"
ERROR_PREFIX = "org.secondsite.Setup1.Error."
CONTRACT = "org.secondsite.Setup1.xml"
GENERIC_FAILURE = "internal error; see the journal of secondsite-setupd"
MAX_ARG_CHARS = 4096
# Record keys that are always string lists: sent as `as` even when empty (the bridge
# would send an empty list as aa{sv}).
STRING_LISTS = frozenset({"addresses", "dns"})

_PROPERTIES_IFACE = "org.freedesktop.DBus.Properties"
_INTROSPECTABLE_IFACE = "org.freedesktop.DBus.Introspectable"
_ASYNC = {"async_callbacks": ("reply", "error")}


def contract_xml() -> str:
    return resources.files("appliance.setup").joinpath(CONTRACT).read_text()


class ServeError(Exception):
    """The service could not be put on the bus (an operator/policy problem, not a bug)."""


class _DBusError(dbus.DBusException):
    include_traceback = False

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message, name=name)


def map_error(exc: BaseException) -> dbus.DBusException:
    if isinstance(exc, dbus.DBusException):
        return exc
    if isinstance(exc, SetupError):
        return _DBusError(ERROR_PREFIX + exc.dbus_name, exc.message)
    if isinstance(exc, BridgeClosed):
        return _DBusError(ERROR_PREFIX + "Failed", "the setup service is shutting down")
    _log.error("bug while serving a D-Bus call", exc_info=exc)
    return _DBusError(ERROR_PREFIX + "Failed", GENERIC_FAILURE)


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


def _properties(summary: Summary) -> dict[str, Any]:
    return {
        "Version": dbus.String(summary.version),
        "Hostname": dbus.String(summary.hostname),
        "ManagementInterface": dbus.String(summary.management_interface),
        "ConfigServer": dbus.String(summary.config_server),
    }


class Setup1(SignatureCheckedObject):
    """The org.secondsite.Setup1 object; methods delegate to a `SetupCore`."""

    def __init__(self, core: SetupCore, bridge: CallBridge, glib: GLibThread) -> None:
        super().__init__()
        self._core = core
        self._bridge = bridge
        self._glib = glib
        self.last_call = time.monotonic()  # read by the daemon's idle exit

    def _submit(
        self, reply: Reply, error: ErrorReply, work: Callable[[], Any], out: Callable[[Any], Any]
    ) -> None:
        self.last_call = time.monotonic()
        self._bridge.submit(reply, error, work, out)

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

    @dbus.service.method(INTERFACE, in_signature="ss", out_signature="", **_ASYNC)
    def Register(self, address: str, passphrase: str, reply: Reply, error: ErrorReply) -> None:
        work = lambda: self._core.register(  # noqa: E731
            _arg(address, "address"), _arg(passphrase, "passphrase")
        )
        self._submit(reply, error, work, _none)

    # -- properties (read-only) ----------------------------------------------------------

    async def _summary(self) -> dict[str, Any]:
        return _properties(await self._core.summary())

    @dbus.service.method(_PROPERTIES_IFACE, in_signature="ss", out_signature="v", **_ASYNC)
    def Get(self, interface_name: str, property_name: str, reply: Reply, error: ErrorReply) -> None:
        def pick(props: dict[str, Any]) -> tuple[Any, ...]:
            _check_interface(interface_name)
            if property_name not in props:
                raise _unknown_property(property_name)
            return (props[property_name],)

        self._submit(reply, error, self._summary, pick)

    @dbus.service.method(_PROPERTIES_IFACE, in_signature="s", out_signature="a{sv}", **_ASYNC)
    def GetAll(self, interface_name: str, reply: Reply, error: ErrorReply) -> None:
        def every(props: dict[str, Any]) -> tuple[Any, ...]:
            _check_interface(interface_name)
            return (dbus.Dictionary(props, signature="sv"),)

        self._submit(reply, error, self._summary, every)

    @dbus.service.method(_PROPERTIES_IFACE, in_signature="ssv", out_signature="")
    def Set(self, interface_name: str, property_name: str, value: Any) -> None:
        _check_interface(interface_name)
        if property_name not in _PROPERTY_NAMES:
            raise _unknown_property(property_name)
        raise _DBusError(
            "org.freedesktop.DBus.Error.PropertyReadOnly",
            f"{property_name} is read-only; use the Set* methods",
        )

    @dbus.service.method(
        _INTROSPECTABLE_IFACE,
        in_signature="",
        out_signature="s",
        path_keyword="object_path",
        connection_keyword="connection",
    )
    def Introspect(self, object_path: str, connection: Any) -> str:
        # dbus-python knows methods and signals, not properties: those come from the contract.
        generated = dbus.service.Object.Introspect(self, object_path, connection)
        return _with_contract_properties(generated)

    # -- signals ---------------------------------------------------------------------------

    @dbus.service.signal(INTERFACE, signature="s")
    def Changed(self, what: str) -> None:
        """Something setup manages changed."""

    def notify(self, change: ChangeEvent) -> None:
        """The `SetupCore.subscribe` listener: called on the loop, emits on GLib."""
        self._glib.call_soon(partial(self.Changed, dbus.String(change.what)))


_PROPERTY_NAMES = frozenset(
    e.get("name") for e in ET.fromstring(contract_xml()).iter("property") if e.get("name")
)


def _check_interface(interface_name: str) -> None:
    if interface_name not in ("", INTERFACE):
        raise _DBusError(
            "org.freedesktop.DBus.Error.UnknownInterface",
            f"{interface_name!r} has no properties here",
        )


def _unknown_property(name: str) -> dbus.DBusException:
    return _DBusError("org.freedesktop.DBus.Error.UnknownProperty", f"no property {name!r}")


def _with_contract_properties(generated: str) -> str:
    contract = ET.fromstring(contract_xml()).find(f"interface[@name='{INTERFACE}']")
    assert contract is not None, "the contract XML lost its interface"
    properties = [ET.tostring(p, encoding="unicode").strip() for p in contract.iter("property")]
    marker = f'<interface name="{INTERFACE}">\n'
    head, found, tail = generated.partition(marker)
    if not found:
        return generated
    return head + marker + "".join(f"    {p}\n" for p in properties) + tail


class Setup1Server:
    """The handle `serve_setup1` returns: `close()` takes the service off the bus."""

    def __init__(
        self,
        glib: GLibThread,
        connection: Any,
        obj: Setup1,
        bridge: CallBridge,
        unsubscribe: Callable[[], None],
    ) -> None:
        self._glib = glib
        self._connection = connection
        self.obj = obj
        self._bridge = bridge
        self._unsubscribe = unsubscribe
        self._closed = False

    @property
    def glib(self) -> GLibThread:
        return self._glib

    def idle_seconds(self) -> float:
        return time.monotonic() - self.obj.last_call

    def close(self) -> None:
        """Stop signals, fail calls in flight, leave the bus, stop the GLib thread.
        Idempotent; not from the GLib thread."""
        if self._closed:
            return
        self._closed = True
        self._unsubscribe()
        self._bridge.close()
        try:
            self._glib.call(partial(_leave_bus, self._connection, self.obj), timeout=10.0)
        finally:
            self._glib.stop()


def _leave_bus(connection: Any, obj: Setup1) -> None:
    obj.remove_from_connection()
    connection.flush()
    connection.close()


def _own_name(connection: Any) -> None:
    try:
        answer = connection.request_name(BUS_NAME, dbus.bus.NAME_FLAG_DO_NOT_QUEUE)
    except dbus.DBusException as exc:
        raise ServeError(
            f"cannot own {BUS_NAME}: {exc.get_dbus_message()} ({exc.get_dbus_name()}); "
            "is org.secondsite.Setup1.conf installed in /usr/share/dbus-1/system.d, and "
            "does setupd run as root?"
        ) from None
    if answer not in (
        dbus.bus.REQUEST_NAME_REPLY_PRIMARY_OWNER,
        dbus.bus.REQUEST_NAME_REPLY_ALREADY_OWNER,
    ):
        raise ServeError(f"cannot own {BUS_NAME}: another process already owns it")


def serve_setup1(
    core: SetupCore, loop: asyncio.AbstractEventLoop, bus_address: str | None = None
) -> Setup1Server:
    """Put `core` on the bus as org.secondsite.Setup1 (None: the system bus).

    Call on `loop`'s thread or before it runs (it subscribes to `core`). Raises
    ServeError when the bus is unreachable or the name cannot be owned.
    """
    glib = GLibThread(name="setupd-dbus")
    glib.start()
    bridge = CallBridge(loop, glib, map_error)
    connection: Any = None
    try:

        def setup() -> tuple[Any, Setup1]:
            nonlocal connection
            target = dbus.bus.BusConnection.TYPE_SYSTEM if bus_address is None else bus_address
            try:
                connection = dbus.bus.BusConnection(target, mainloop=glib.mainloop)
            except dbus.DBusException as exc:
                where = bus_address or "the system bus"
                raise ServeError(f"cannot connect to {where}: {exc.get_dbus_message()}") from None
            obj = Setup1(core, bridge, glib)
            obj.add_to_connection(connection, OBJECT_PATH)  # before the name: no miss
            _own_name(connection)
            return connection, obj

        connection, obj = glib.call(setup)
        unsubscribe = core.subscribe(obj.notify)
    except BaseException:
        if connection is not None:
            glib.call(connection.close)
        glib.stop()
        raise
    return Setup1Server(glib, connection, obj, bridge, unsubscribe)
