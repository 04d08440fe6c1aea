"""Ask systemd-networkd to reload its .network files, so a change needs no reboot.

SetInterface applies a change with netlink at once and writes the networkd file that
keeps it across reboots; networkd itself only reads that file when asked
(org.freedesktop.network1.Manager.Reload, what `networkctl reload` calls), and
then reconfigures the links whose file changed — DHCP included, which netlink alone
cannot start. networkd not running (a test machine, an image without it) is not an
error: the answer says the file applies at the next boot.
"""

from __future__ import annotations

import logging

import dbus
import dbus.bus

_log = logging.getLogger(__name__)

DESTINATION = "org.freedesktop.network1"
PATH = "/org/freedesktop/network1"
MANAGER = "org.freedesktop.network1.Manager"
TIMEOUT = 30.0
RELOADED = "reloaded"
ABSENT = frozenset(
    {
        "org.freedesktop.DBus.Error.ServiceUnknown",
        "org.freedesktop.DBus.Error.NameHasNoOwner",
        "org.freedesktop.systemd1.NoSuchUnit",
        "org.freedesktop.systemd1.UnitMasked",
    }
)


class Networkd:
    """`address` None is the system bus; "none" means there is no networkd to ask."""

    def __init__(self, address: str | None = None) -> None:
        self.address = address

    def reload(self) -> str:
        """RELOADED, or one line saying why networkd was not (and what that means)."""
        if self.address == "none":
            return "systemd-networkd is not used here: the file applies at the next boot"
        target = dbus.bus.BusConnection.TYPE_SYSTEM if self.address is None else self.address
        try:
            connection = dbus.bus.BusConnection(target)
        except dbus.DBusException as exc:
            return f"no system bus to reach systemd-networkd ({exc.get_dbus_message()}): " + (
                "the file applies at the next boot"
            )
        try:
            connection.call_blocking(DESTINATION, PATH, MANAGER, "Reload", "", [], timeout=TIMEOUT)
        except dbus.DBusException as exc:
            name = exc.get_dbus_name()
            if name in ABSENT or name.startswith("org.freedesktop.DBus.Error.Spawn"):
                return "systemd-networkd is not running: the file applies at the next boot"
            _log.warning("networkd Reload failed: %s (%s)", exc.get_dbus_message(), name)
            return (
                f"systemd-networkd refused to reload: {exc.get_dbus_message()} ({name}); "
                "the change is applied now, the file at the next boot"
            )
        finally:
            connection.close()
        return RELOADED
