"""NTP servers for systemd-timesyncd, as a drop-in it reads at start.

`timesyncd.conf.d/50-secondsite.conf` holds `[Time] NTP=<servers>`; an empty list
removes the drop-in, so timesyncd falls back to the servers DHCP gives and then to the
image's defaults. After a change timesyncd is restarted (if it runs) to read it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from appliance.setup import validate
from appliance.setup.errors import InvalidArgument
from appliance.storage.atomic import atomic_write, fsync_dir

_log = logging.getLogger(__name__)

DEFAULT_DIRECTORY = Path("/etc/systemd/timesyncd.conf.d")
DROPIN = "50-secondsite.conf"
TIMESYNCD = "systemd-timesyncd.service"
MAX_SERVERS = 8


class Ntp:
    def __init__(
        self,
        directory: Path = DEFAULT_DIRECTORY,
        restart: Callable[[str], None] | None = None,
    ) -> None:
        self.path = directory / DROPIN
        self._restart = restart

    def get(self) -> list[str]:
        """The servers setup configured ([] when the drop-in is absent)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        servers: list[str] = []
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip() == "NTP":
                servers = value.split()  # a later NTP= line replaces, as in timesyncd
        return servers

    def set(self, servers: list[str]) -> list[str]:
        if len(servers) > MAX_SERVERS:
            raise InvalidArgument(f"at most {MAX_SERVERS} NTP servers")
        clean = list(dict.fromkeys(validate.ntp_server(s) for s in servers))
        if clean:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            text = (
                "# Written by secondsite-setupd (org.secondsite.Setup1.SetNtp).\n"
                f"[Time]\nNTP={' '.join(clean)}\n"
            )
            atomic_write(self.path, text.encode(), 0o644)
        elif self.path.exists():
            self.path.unlink()
            fsync_dir(self.path.parent)
        if self._restart is not None:
            self._restart(TIMESYNCD)
        _log.info("NTP servers set to %s", clean or "the defaults")
        return clean
