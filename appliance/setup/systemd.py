"""A blocking client of systemd's own D-Bus API (org.freedesktop.systemd1.Manager).

Used from worker threads (never the GLib thread): each operation opens its own
connection without a main loop, so nothing here touches the service's dispatcher.
`address` None is the system bus; a test passes the bus a systemd user instance
is on. Every D-Bus failure becomes Failed with systemd's own error name and text.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dbus
import dbus.bus

from appliance.setup.errors import Failed

DESTINATION = "org.freedesktop.systemd1"
PATH = "/org/freedesktop/systemd1"
MANAGER = "org.freedesktop.systemd1.Manager"
UNIT = "org.freedesktop.systemd1.Unit"
PROPERTIES = "org.freedesktop.DBus.Properties"
TIMEOUT = 30.0
NO_SUCH_UNIT = "org.freedesktop.systemd1.NoSuchUnit"


class SystemdClient:
    """Enable/disable/start/stop units and read their state; see the module doc."""

    def __init__(self, address: str | None = None) -> None:
        self.address = address
        self._lock = threading.Lock()  # one conversation with systemd at a time

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        target = dbus.bus.BusConnection.TYPE_SYSTEM if self.address is None else self.address
        try:
            connection = dbus.bus.BusConnection(target)
        except dbus.DBusException as exc:
            raise Failed(f"cannot reach systemd's bus: {exc.get_dbus_message()}") from None
        try:
            yield connection
        finally:
            connection.close()

    def _call(self, method: str, signature: str, *args: Any, iface: str = MANAGER,
              path: str = PATH) -> Any:  # fmt: skip
        with self._lock, self._connection() as connection:
            return _blocking(connection, (path, iface, method), signature, list(args))

    def enable(self, units: list[str]) -> list[tuple[str, str, str]]:
        """Enable (not runtime, force), then Reload so the manager sees the links."""
        _, changes = self._call("EnableUnitFiles", "asbb", units, False, True)
        self.reload()
        return [tuple(str(x) for x in c) for c in changes]  # type: ignore[misc]

    def disable(self, units: list[str]) -> list[tuple[str, str, str]]:
        changes = self._call("DisableUnitFiles", "asb", units, False)
        self.reload()
        return [tuple(str(x) for x in c) for c in changes]  # type: ignore[misc]

    def reload(self) -> None:
        self._call("Reload", "")

    def start(self, unit: str) -> str:
        return str(self._call("StartUnit", "ss", unit, "replace"))

    def stop(self, unit: str) -> str:
        return str(self._call("StopUnit", "ss", unit, "replace"))

    def try_restart(self, unit: str) -> None:
        """Restart `unit` if it runs; a unit that does not exist is left alone."""
        try:
            self._call("TryRestartUnit", "ss", unit, "replace")
        except Failed as exc:
            if NO_SUCH_UNIT not in exc.message:
                raise

    def unit_file_state(self, unit: str) -> str:
        """The unit file state: enabled, disabled, static, ... or not-found."""
        try:
            return str(self._call("GetUnitFileState", "s", unit))
        except Failed as exc:
            if "FileNotFound" in exc.message or NO_SUCH_UNIT in exc.message:
                return "not-found"
            raise

    def active_state(self, unit: str) -> str:
        """The unit's ActiveState: active, inactive, activating, failed, ..."""
        with self._lock, self._connection() as connection:
            path = _blocking(connection, (PATH, MANAGER, "LoadUnit"), "s", [unit])
            state = _blocking(
                connection, (str(path), PROPERTIES, "Get"), "ss", [UNIT, "ActiveState"]
            )
        return str(state)


def _blocking(connection: Any, where: tuple[str, str, str], signature: str, args: list[Any]) -> Any:
    path, iface, method = where
    try:
        return connection.call_blocking(
            DESTINATION, path, iface, method, signature, args, timeout=TIMEOUT
        )
    except dbus.DBusException as exc:
        message = f"{exc.get_dbus_message()} ({exc.get_dbus_name()})"
        raise Failed(f"systemd {method}: {message}") from None
