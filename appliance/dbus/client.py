"""A synchronous org.secondsite.Config1 client for command-line tools.

    with Config1Client() as client:
        machines = client.call("ListMachines")          # list of plain dicts
        job = client.call("Protect", "web01", "")       # "" keeps the policy
        print(client.properties()["RunningJobs"])

Arguments are plain Python; their D-Bus types come from the interface contract
(`appliance/config/org.secondsite.Config1.xml`), so an int is sent as `u` where the
method takes `u` and a dict as a{sv} with int64/double/... variants. Results come back
as plain Python (str, int, float, bool, dict, list). Every failure — the service's
own errors, a missing service, a refusal by the bus policy, a timeout, no bus at all —
is a `DBusCallError` carrying the D-Bus error name and message.

The bus is `$SECONDSITE_BUS_ADDRESS` if set, else the system bus. No main loop is
needed: calls block.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from importlib import resources
from types import TracebackType
from typing import Any, ClassVar, Self

import dbus
import dbus.bus

from appliance.dbus.bridge import from_dbus, to_dbus_record

BUS_NAME = "org.secondsite.Config1"
OBJECT_PATH = "/org/secondsite/Config1"
INTERFACE = "org.secondsite.Config1"
ADDRESS_ENV = "SECONDSITE_BUS_ADDRESS"

# Error names a caller may want to tell apart (besides org.secondsite.Config1.Error.*).
SERVICE_UNKNOWN = "org.freedesktop.DBus.Error.ServiceUnknown"  # configd is not running
ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"  # the bus policy refused
NO_REPLY = "org.freedesktop.DBus.Error.NoReply"  # timed out
NO_BUS = "org.secondsite.Client.Error.NoBus"  # could not connect to the bus at all
UNKNOWN_METHOD = "org.secondsite.Client.Error.UnknownMethod"  # not in the contract


class DBusCallError(Exception):
    """A failed call: `name` is the D-Bus error name, `message` its text."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message

    @property
    def short_name(self) -> str:
        """The last part of the name, e.g. "NotFound" or "AccessDenied"."""
        return self.name.rsplit(".", 1)[-1]


def in_signatures(package: str, contract: str) -> dict[str, list[str]]:
    """Each method's input argument types, from the contract XML shipped in `package`."""
    root = ET.fromstring(resources.files(package).joinpath(contract).read_text())
    return {
        str(m.get("name")): [
            str(a.get("type")) for a in m.iter("arg") if a.get("direction", "in") == "in"
        ]
        for m in root.iter("method")
    }


class ServiceClient:
    """One private connection to the bus; calls a Secondsite service synchronously.

    Subclasses name the service and its contract; `_wire` may type arguments further
    (records go out with our variant types: int64, not dbus-python's guess int32)."""

    bus_name: ClassVar[str]
    object_path: ClassVar[str]
    interface: ClassVar[str]
    signatures: ClassVar[dict[str, list[str]]]  # read once, from the contract

    def __init__(self, bus_address: str | None = None, timeout: float = 25.0) -> None:
        address = bus_address or os.environ.get(ADDRESS_ENV) or None
        self._timeout = timeout
        try:
            target = dbus.bus.BusConnection.TYPE_SYSTEM if address is None else address
            self._connection = dbus.bus.BusConnection(target)
        except dbus.DBusException as exc:
            where = address or "the system bus"
            raise DBusCallError(NO_BUS, f"cannot connect to {where}: {exc}") from None

    def _wire(self, value: Any, signature: str) -> Any:
        return to_dbus_record(value) if signature == "a{sv}" else value

    def call(self, method: str, *args: Any) -> Any:
        """Call `method` of the service's interface; None or its result, plain Python."""
        signature = self.signatures.get(method)
        if signature is None:
            raise DBusCallError(UNKNOWN_METHOD, f"{self.interface} has no method {method!r}")
        if len(args) != len(signature):
            raise DBusCallError(
                "org.freedesktop.DBus.Error.InvalidArgs",
                f"{method} takes {len(signature)} arguments, not {len(args)}",
            )
        wire = [self._wire(a, sig) for a, sig in zip(args, signature, strict=True)]
        return self._invoke(self.interface, method, "".join(signature), wire)

    def properties(self) -> dict[str, Any]:
        """Every property of the interface as a plain dict."""
        result: dict[str, Any] = self._invoke(
            "org.freedesktop.DBus.Properties", "GetAll", "s", [self.interface]
        )
        return result

    def _invoke(self, interface: str, method: str, signature: str, args: list[Any]) -> Any:
        # No proxy object: it would resolve the name's owner at construction, failing
        # before the call with an error of its own; the contract gives the signatures.
        try:
            result = self._connection.call_blocking(
                self.bus_name, self.object_path, interface, method, signature, args,
                timeout=self._timeout,
            )  # fmt: skip
        except dbus.DBusException as exc:
            name = exc.get_dbus_name() or "org.freedesktop.DBus.Error.Failed"
            raise DBusCallError(name, exc.get_dbus_message() or str(exc)) from None
        return None if result is None else from_dbus(result)

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Config1Client(ServiceClient):
    """org.secondsite.Config1 (the configuration server)."""

    bus_name = BUS_NAME
    object_path = OBJECT_PATH
    interface = INTERFACE
    signatures = in_signatures("appliance.config", "org.secondsite.Config1.xml")
