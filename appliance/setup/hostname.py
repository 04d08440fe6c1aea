"""The appliance's hostname: `/etc/hostname` for the next boot, sethostname(2) for now.

Chosen over systemd-hostnamed's D-Bus API (SetStaticHostname + SetHostname): the
result is the same two effects, but this needs no other bus-activated service (nor
its polkit checks) on a minimal image, runs unchanged in a test against a directory
root, and fails with the kernel's own error. It needs CAP_SYS_ADMIN in the host's UTS
namespace, so the unit must not set ProtectHostname=.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from pathlib import Path

from appliance.setup import validate
from appliance.setup.errors import Failed
from appliance.storage.atomic import atomic_write

_log = logging.getLogger(__name__)


class Hostname:
    def __init__(
        self,
        root: Path = Path("/"),
        sethostname: Callable[[str], None] = socket.sethostname,
        gethostname: Callable[[], str] = socket.gethostname,
    ) -> None:
        self.path = root / "etc" / "hostname"
        self._sethostname = sethostname
        self._gethostname = gethostname

    def get(self) -> str:
        """The static hostname if one is set, else the kernel's (transient) one."""
        try:
            for line in self.path.read_text().splitlines():
                name = line.strip()
                if name and not name.startswith("#"):
                    return name
        except FileNotFoundError:
            pass
        return self._gethostname()

    def set(self, value: str) -> str:
        name = validate.hostname(value)
        try:
            atomic_write(self.path, f"{name}\n".encode(), 0o644)
            self._sethostname(name)
        except OSError as exc:
            raise Failed(f"cannot set the hostname to {name}: {exc.strerror or exc}") from None
        _log.info("hostname set to %s", name)
        return name
