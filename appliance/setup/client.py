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

from collections.abc import Mapping
from typing import Any

import dbus
import dbus.bus

from appliance.dbus.bridge import to_dbus_value
from appliance.dbus.client import ServiceClient, in_signatures

BUS_NAME = "org.secondsite.Setup1"
OBJECT_PATH = "/org/secondsite/Setup1"
INTERFACE = "org.secondsite.Setup1"
ERROR_PREFIX = "org.secondsite.Setup1.Error."
# Unit jobs are waited for (up to 120 s), and Register enrols two daemons and starts
# their units: far longer than a read. The console runs calls in a worker anyway.
TIMEOUT = 300.0
# Settings that are string lists even when empty: the bridge sends [] as aa{sv}.
STRING_LISTS = frozenset({"addresses", "dns"})


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


class Setup1Client(ServiceClient):
    """org.secondsite.Setup1 (the setup service); calls block for at most `timeout` s."""

    bus_name = BUS_NAME
    object_path = OBJECT_PATH
    interface = INTERFACE
    signatures = in_signatures("appliance.setup", "org.secondsite.Setup1.xml")

    def __init__(self, bus_address: str | None = None, timeout: float = TIMEOUT) -> None:
        super().__init__(bus_address, timeout)

    def _wire(self, value: Any, signature: str) -> Any:
        return _wire(value, signature)
