"""A synchronous org.secondsite.Setup1 client (the console's wizard and services view).

    with Setup1Client() as setup:
        setup.call("SetHostname", "dr-ps1")
        setup.call("SetInterface", "ens192", {"method": "dhcp", "dns": []}, False)

The same shape as `Config1Client`: arguments are plain Python, typed by the contract
(`org.secondsite.Setup1.xml`), results come back as plain Python, and every failure
is a `DBusCallError` (e.g. `org.secondsite.Setup1.Error.NeedsConfirmation`). The bus
is `$SECONDSITE_BUS_ADDRESS` if set, else the system bus.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from importlib import resources
from types import TracebackType
from typing import Any

import dbus
import dbus.bus

from appliance.dbus.bridge import from_dbus, to_dbus_value
from appliance.dbus.client import ADDRESS_ENV, NO_BUS, UNKNOWN_METHOD, DBusCallError

BUS_NAME = "org.secondsite.Setup1"
OBJECT_PATH = "/org/secondsite/Setup1"
INTERFACE = "org.secondsite.Setup1"
ERROR_PREFIX = "org.secondsite.Setup1.Error."
# Settings that are string lists even when empty: the bridge sends [] as aa{sv}.
STRING_LISTS = frozenset({"addresses", "dns"})


def _in_signatures() -> dict[str, list[str]]:
    xml = resources.files("appliance.setup").joinpath("org.secondsite.Setup1.xml")
    root = ET.fromstring(xml.read_text())
    return {
        str(m.get("name")): [
            str(a.get("type")) for a in m.iter("arg") if a.get("direction", "in") == "in"
        ]
        for m in root.iter("method")
    }


_SIGNATURES = _in_signatures()


def _settings(record: Mapping[str, Any]) -> dbus.Dictionary:
    out: dict[Any, Any] = {}
    for key, value in record.items():
        if value is None:
            continue
        if key in STRING_LISTS:
            out[dbus.String(key)] = dbus.Array([dbus.String(v) for v in value], signature="s")
        else:
            out[dbus.String(key)] = to_dbus_value(value)
    return dbus.Dictionary(out, signature="sv")


def _wire(value: Any, signature: str) -> Any:
    if signature == "a{sv}":
        return _settings(value)
    if signature == "as":
        return dbus.Array([dbus.String(v) for v in value], signature="s")
    return value


class Setup1Client:
    """One private connection to the bus; calls block for at most `timeout` seconds."""

    def __init__(self, bus_address: str | None = None, timeout: float = 25.0) -> None:
        address = bus_address or os.environ.get(ADDRESS_ENV) or None
        self._timeout = timeout
        try:
            target = dbus.bus.BusConnection.TYPE_SYSTEM if address is None else address
            self._connection = dbus.bus.BusConnection(target)
        except dbus.DBusException as exc:
            where = address or "the system bus"
            raise DBusCallError(NO_BUS, f"cannot connect to {where}: {exc}") from None

    def call(self, method: str, *args: Any) -> Any:
        """Call `method` of org.secondsite.Setup1; None or its one result."""
        signature = _SIGNATURES.get(method)
        if signature is None:
            raise DBusCallError(UNKNOWN_METHOD, f"{INTERFACE} has no method {method!r}")
        if len(args) != len(signature):
            raise DBusCallError(
                "org.freedesktop.DBus.Error.InvalidArgs",
                f"{method} takes {len(signature)} arguments, not {len(args)}",
            )
        wire = [_wire(a, sig) for a, sig in zip(args, signature, strict=True)]
        try:
            # No proxy object: it would look the name up first, failing differently.
            result = self._connection.call_blocking(
                BUS_NAME,
                OBJECT_PATH,
                INTERFACE,
                method,
                "".join(signature),
                wire,
                timeout=self._timeout,
            )
        except dbus.DBusException as exc:
            name = exc.get_dbus_name() or "org.freedesktop.DBus.Error.Failed"
            raise DBusCallError(name, exc.get_dbus_message() or str(exc)) from None
        return None if result is None else from_dbus(result)

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> Setup1Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
