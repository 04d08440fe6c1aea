"""A tiny sd_notify(3): datagrams to $NOTIFY_SOCKET, no libsystemd needed.

systemd passes the socket path in NOTIFY_SOCKET (a leading "@" means the abstract
namespace). Outside systemd the variable is unset and every call is a no-op, so the
daemons run the same way by hand, under the tests and under a unit.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    """Sends READY/STATUS/WATCHDOG/STOPPING to the service manager, if there is one."""

    def __init__(self, address: str | None = None) -> None:
        address = os.environ.get("NOTIFY_SOCKET") if address is None else address
        self._address: str | None = None
        if address:
            # systemd uses "@name" for abstract sockets; the kernel wants a leading NUL.
            self._address = "\0" + address[1:] if address.startswith("@") else address
        self._watchdog_usec = _watchdog_usec()
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half the manager's timeout), or None."""
        return self._watchdog_usec / 2e6 if self._watchdog_usec else None

    def notify(self, **fields: str | int) -> bool:
        """Send KEY=value lines (keys upper-cased); False if not under a service manager."""
        if self._address is None:
            return False
        payload = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self._address)
                sock.sendall(payload)
        except OSError as exc:
            # The manager went away (or never listened): a daemon must not die of that.
            if not self._warned:
                log.warning("cannot notify the service manager: %s", exc)
                self._warned = True
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify(ready=1, status=status, mainpid=os.getpid())

    def status(self, status: str) -> bool:
        return self.notify(status=status)

    def watchdog(self) -> bool:
        return self.notify(watchdog=1)

    def stopping(self, status: str = "Stopping") -> bool:
        return self.notify(stopping=1, status=status)


def _watchdog_usec() -> int:
    # WATCHDOG_PID, when set, names the process the watchdog is meant for.
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return 0
    try:
        return int(os.environ.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return 0
