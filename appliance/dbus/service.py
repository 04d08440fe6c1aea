"""What every Secondsite D-Bus service shares: the contract, errors, properties, serving.

A service (Config1, Setup1) is a `ContractObject` subclass declaring its methods and
signals, with its interface contract (an XML file beside its module) and a coroutine
returning its properties. This module gives it the read-only Properties interface,
introspection with the contract's properties, the mapping of exceptions to named
errors, and `serve()`, which puts it on a bus through a GLib thread and returns the
handle that takes it off again.
"""

from __future__ import annotations

import asyncio
import logging
import xml.etree.ElementTree as ET
from collections.abc import Callable
from functools import cached_property, partial
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
)
from appliance.dbus.glib import GLibThread

PROPERTIES_IFACE = "org.freedesktop.DBus.Properties"
INTROSPECTABLE_IFACE = "org.freedesktop.DBus.Introspectable"
ASYNC = {"async_callbacks": ("reply", "error")}


class ServeError(Exception):
    """The service could not be put on the bus (an operator/policy problem, not a bug)."""


class NamedError(dbus.DBusException):
    """A named D-Bus error whose reply carries the message only, never a traceback."""

    include_traceback = False

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message, name=name)


def error_mapper(
    prefix: str, domain: type[Exception], shutting_down: str, generic: str, log: logging.Logger
) -> Callable[[BaseException], dbus.DBusException]:
    """The bridge's exception mapping: a `domain` leaf (with `dbus_name` and `message`)
    becomes `<prefix><dbus_name>`; anything else is a bug, logged once, answered with
    the generic `<prefix>Failed`."""

    def map_error(exc: BaseException) -> dbus.DBusException:
        if isinstance(exc, dbus.DBusException):
            return exc  # already named on purpose (e.g. a standard Properties error)
        if isinstance(exc, domain):
            return NamedError(prefix + getattr(exc, "dbus_name", "Failed"), str(exc))
        if isinstance(exc, BridgeClosed):
            return NamedError(prefix + "Failed", shutting_down)
        log.error("bug while serving a D-Bus call", exc_info=exc)
        return NamedError(prefix + "Failed", generic)

    return map_error


class Contract:
    """An interface's contract: the introspection XML kept beside its module."""

    def __init__(self, package: str, filename: str, interface: str) -> None:
        self.package, self.filename, self.interface = package, filename, interface

    def xml(self) -> str:
        return resources.files(self.package).joinpath(self.filename).read_text()

    @cached_property
    def property_names(self) -> frozenset[str]:
        return frozenset(
            str(e.get("name")) for e in ET.fromstring(self.xml()).iter("property") if e.get("name")
        )

    def check_interface(self, interface_name: str) -> None:
        if interface_name not in ("", self.interface):
            raise NamedError(
                "org.freedesktop.DBus.Error.UnknownInterface",
                f"{interface_name!r} has no properties here",
            )

    @staticmethod
    def unknown_property(name: str) -> dbus.DBusException:
        return NamedError("org.freedesktop.DBus.Error.UnknownProperty", f"no property {name!r}")

    def with_properties(self, generated: str) -> str:
        """dbus-python's generated introspection plus the contract's properties (it
        knows the methods and signals actually implemented, nothing of properties)."""
        contract = ET.fromstring(self.xml()).find(f"interface[@name='{self.interface}']")
        assert contract is not None, "the contract XML lost its interface"
        properties = [ET.tostring(p, encoding="unicode").strip() for p in contract.iter("property")]
        marker = f'<interface name="{self.interface}">\n'
        head, found, tail = generated.partition(marker)
        if not found:
            return generated
        return head + marker + "".join(f"    {p}\n" for p in properties) + tail


class ContractObject(SignatureCheckedObject):
    """A service object with read-only properties and contract-true introspection.

    Subclasses set `contract` and `read_only_hint`, and implement `_properties()` (a
    coroutine run on the asyncio loop, returning dbus-typed values by name)."""

    contract: Contract
    read_only_hint = ""

    def __init__(self, bridge: CallBridge, glib: GLibThread) -> None:
        super().__init__()
        self._bridge = bridge
        self._glib = glib

    def _submit(
        self, reply: Reply, error: ErrorReply, work: Callable[[], Any], out: Callable[[Any], Any]
    ) -> None:
        self._bridge.submit(reply, error, work, out)

    async def _properties(self) -> dict[str, Any]:
        raise NotImplementedError

    @dbus.service.method(PROPERTIES_IFACE, in_signature="ss", out_signature="v", **ASYNC)
    def Get(self, interface_name: str, property_name: str, reply: Reply, error: ErrorReply) -> None:
        def pick(props: dict[str, Any]) -> tuple[Any, ...]:
            self.contract.check_interface(interface_name)
            if property_name not in props:
                raise self.contract.unknown_property(property_name)
            return (props[property_name],)

        self._submit(reply, error, self._properties, pick)

    @dbus.service.method(PROPERTIES_IFACE, in_signature="s", out_signature="a{sv}", **ASYNC)
    def GetAll(self, interface_name: str, reply: Reply, error: ErrorReply) -> None:
        def every(props: dict[str, Any]) -> tuple[Any, ...]:
            self.contract.check_interface(interface_name)
            return (dbus.Dictionary(props, signature="sv"),)

        self._submit(reply, error, self._properties, every)

    @dbus.service.method(PROPERTIES_IFACE, in_signature="ssv", out_signature="")
    def Set(self, interface_name: str, property_name: str, value: Any) -> None:
        self.contract.check_interface(interface_name)
        if property_name not in self.contract.property_names:
            raise self.contract.unknown_property(property_name)
        raise NamedError(
            "org.freedesktop.DBus.Error.PropertyReadOnly",
            f"{property_name} is read-only{self.read_only_hint}",
        )

    @dbus.service.method(
        INTROSPECTABLE_IFACE,
        in_signature="",
        out_signature="s",
        path_keyword="object_path",
        connection_keyword="connection",
    )
    def Introspect(self, object_path: str, connection: Any) -> str:
        generated = dbus.service.Object.Introspect(self, object_path, connection)
        return self.contract.with_properties(generated)


class ServedObject:
    """The handle `serve` returns: `close()` takes the service off the bus."""

    def __init__(
        self,
        glib: GLibThread,
        connection: Any,
        obj: Any,
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
        """The process's GLib thread: other dbus-python connections attached to a main
        loop in this process are dispatched by it and must be used only from it."""
        return self._glib

    def close(self) -> None:
        """Stop signals, fail calls in flight, leave the bus and stop the GLib thread.

        Idempotent. Must not be called from the GLib thread.
        """
        if self._closed:
            return
        self._closed = True
        self._unsubscribe()
        self._bridge.close()
        try:
            self._glib.call(partial(_leave_bus, self._connection, self.obj), timeout=10.0)
        finally:
            self._glib.stop()


def _leave_bus(connection: Any, obj: Any) -> None:
    if not connection.get_is_connected():
        return  # the bus went first (daemon stopped, or it dropped us): nothing to leave
    obj.remove_from_connection()
    connection.flush()  # the errors of cancelled calls go out before we leave
    connection.close()  # also gives up the name


def _own_name(connection: Any, bus_name: str, policy_hint: str) -> None:
    try:
        answer = connection.request_name(bus_name, dbus.bus.NAME_FLAG_DO_NOT_QUEUE)
    except dbus.DBusException as exc:
        raise ServeError(
            f"cannot own {bus_name}: {exc.get_dbus_message()} ({exc.get_dbus_name()}); "
            + policy_hint
        ) from None
    if answer not in (
        dbus.bus.REQUEST_NAME_REPLY_PRIMARY_OWNER,
        dbus.bus.REQUEST_NAME_REPLY_ALREADY_OWNER,
    ):
        raise ServeError(f"cannot own {bus_name}: another process already owns it")


def serve(
    *,
    bus_name: str,
    object_path: str,
    thread_name: str,
    make: Callable[[CallBridge, GLibThread], ContractObject],
    subscribe: Callable[[ContractObject], Callable[[], None]],
    map_error: Callable[[BaseException], dbus.DBusException],
    loop: asyncio.AbstractEventLoop,
    bus_address: str | None,
    policy_hint: str,
) -> tuple[GLibThread, Any, ContractObject, CallBridge, Callable[[], None]]:
    """Start a GLib thread, connect (None: the system bus), export `make(...)` at
    `object_path`, own `bus_name`, then `subscribe(obj)` for its signals; the parts
    a `ServedObject` is made of. Blocks briefly for the bus handshake; call it on
    `loop`'s thread (or before the loop runs). ServeError when the bus is unreachable
    or the name cannot be owned; nothing is left running then."""
    glib = GLibThread(name=thread_name)
    glib.start()
    bridge = CallBridge(loop, glib, map_error)
    connection: Any = None
    try:

        def setup() -> tuple[Any, ContractObject]:
            nonlocal connection
            target = dbus.bus.BusConnection.TYPE_SYSTEM if bus_address is None else bus_address
            try:
                connection = dbus.bus.BusConnection(target, mainloop=glib.mainloop)
            except dbus.DBusException as exc:
                where = bus_address or "the system bus"
                raise ServeError(f"cannot connect to {where}: {exc.get_dbus_message()}") from None
            obj = make(bridge, glib)
            # Exported before the name is taken: the first call finds the object.
            obj.add_to_connection(connection, object_path)
            _own_name(connection, bus_name, policy_hint)
            return connection, obj

        connection, obj = glib.call(setup)
        unsubscribe = subscribe(obj)
    except BaseException:
        if connection is not None:
            glib.call(connection.close)
        glib.stop()
        raise
    return glib, connection, obj, bridge, unsubscribe
