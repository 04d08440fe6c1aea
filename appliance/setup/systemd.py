"""A blocking client of systemd's own D-Bus API (org.freedesktop.systemd1.Manager).

Used from worker threads (never the GLib thread): each operation opens its own
connection without a main loop, so nothing here touches the service's dispatcher.
`address` None is the system bus; a test passes the bus a systemd user instance
is on. Every D-Bus failure becomes Failed with systemd's own error name and text.
"""

from __future__ import annotations

import threading
import time
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
JOB = "org.freedesktop.systemd1.Job"
SERVICE = "org.freedesktop.systemd1.Service"
UNKNOWN_OBJECT = "org.freedesktop.DBus.Error.UnknownObject"
JOB_TIMEOUT = 120.0  # longer than a unit's default start timeout (90 s)
JOB_POLL = 0.05


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

    def run_job(self, method: str, unit: str, timeout: float = JOB_TIMEOUT) -> dict[str, str]:
        """StartUnit/StopUnit/RestartUnit `unit`, wait until its job is done, and return
        the unit's state afterwards: {active_state, sub_state, result}.

        The job is followed by polling its object (it disappears when the job ends):
        a blocking connection receives no JobRemoved signal. Raises Failed when
        systemd refuses the job or it is still queued after `timeout` seconds.
        """
        with self._lock, self._connection() as connection:
            job = str(_blocking(connection, (PATH, MANAGER, method), "ss", [unit, "replace"]))
            _wait_for_job(connection, job, f"{method} {unit}", timeout)
            return _unit_status(connection, unit)

    def run_transient(
        self, name: str, properties: list[tuple[str, Any]], timeout: float = JOB_TIMEOUT
    ) -> dict[str, str]:
        """Start the transient unit `name` (StartTransientUnit with `properties`, typed
        dbus values), wait for its job, and return its state afterwards. A failed run
        is reset (ResetFailedUnit) once read, so the name can be used again."""
        with self._lock, self._connection() as connection:
            _reset_failed(connection, name)  # a failed earlier run would block the name
            job = str(_blocking(connection, (PATH, MANAGER, "StartTransientUnit"),
                                "ssa(sv)a(sa(sv))", [name, "fail", properties, []]))  # fmt: skip
            _wait_for_job(connection, job, f"StartTransientUnit {name}", timeout)
            status = _unit_status(connection, name)
            _reset_failed(connection, name)
            return status

    def unit_status(self, unit: str) -> dict[str, str]:
        """{active_state, sub_state, result} of a loaded (or loadable) unit."""
        with self._lock, self._connection() as connection:
            return _unit_status(connection, unit)


def _wait_for_job(connection: Any, job: str, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _job_exists(connection, job):
        if time.monotonic() > deadline:
            raise Failed(f"systemd {what}: the job is still running after {timeout:.0f} s "
                         "(systemctl list-jobs)")  # fmt: skip
        time.sleep(JOB_POLL)


def _reset_failed(connection: Any, unit: str) -> None:
    try:
        _blocking(connection, (PATH, MANAGER, "ResetFailedUnit"), "s", [unit])
    except Failed as exc:
        if NO_SUCH_UNIT not in exc.message:
            raise


def _job_exists(connection: Any, job: str) -> bool:
    try:
        connection.call_blocking(
            DESTINATION, job, PROPERTIES, "Get", "ss", [JOB, "State"], timeout=TIMEOUT
        )
    except dbus.DBusException as exc:
        if exc.get_dbus_name() == UNKNOWN_OBJECT:
            return False
        raise Failed(f"systemd job {job}: {exc.get_dbus_message()}") from None
    return True


def _unit_status(connection: Any, unit: str) -> dict[str, str]:
    path = str(_blocking(connection, (PATH, MANAGER, "LoadUnit"), "s", [unit]))
    props = _blocking(connection, (path, PROPERTIES, "GetAll"), "s", [UNIT])
    status = {
        "active_state": str(props.get("ActiveState", "")),
        "sub_state": str(props.get("SubState", "")),
        "result": "",
    }
    if unit.endswith(".service"):
        status["result"] = str(_blocking(connection, (path, PROPERTIES, "Get"), "ss",
                                         [SERVICE, "Result"]))  # fmt: skip
    return status


def _blocking(connection: Any, where: tuple[str, str, str], signature: str, args: list[Any]) -> Any:
    path, iface, method = where
    try:
        return connection.call_blocking(
            DESTINATION, path, iface, method, signature, args, timeout=TIMEOUT
        )
    except dbus.DBusException as exc:
        message = f"{exc.get_dbus_message()} ({exc.get_dbus_name()})"
        raise Failed(f"systemd {method}: {message}") from None
