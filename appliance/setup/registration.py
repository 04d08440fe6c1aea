"""Where a process-server or master-target appliance finds its configuration server.

Register stores the address and the enrolment passphrase; enrolling (the daemons'
`--enroll HOST:PORT --passphrase-file FILE`) is a later step that reads these files.
Layout in the directory (0700, root; default /var/lib/secondsite/setup)::

    config-server   HOST:PORT, one line
    passphrase      the one-time passphrase, one line, mode 0600 (the format
                    --passphrase-file reads)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from appliance.setup import validate
from appliance.setup.errors import InvalidArgument
from appliance.storage.atomic import atomic_write

_log = logging.getLogger(__name__)

DEFAULT_DIRECTORY = Path("/var/lib/secondsite/setup")
ADDRESS_FILE = "config-server"
PASSPHRASE_FILE = "passphrase"
MAX_PASSPHRASE = 1024


class Registration:
    def __init__(self, directory: Path = DEFAULT_DIRECTORY) -> None:
        self.directory = directory

    @property
    def passphrase_path(self) -> Path:
        return self.directory / PASSPHRASE_FILE

    def address(self) -> str:
        """The registered configuration server (HOST:PORT), or "" when none is."""
        try:
            return (self.directory / ADDRESS_FILE).read_text().strip()
        except FileNotFoundError:
            return ""

    def register(self, address: str, passphrase: str) -> str:
        host, port = validate.server_address(address)
        secret = passphrase.strip()
        if not secret or len(secret) > MAX_PASSPHRASE or any(c in secret for c in "\r\n\0"):
            raise InvalidArgument(
                "the passphrase must be one non-empty line (secondsitectl passphrase shows it)"
            )
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        # Passphrase first: an address is only ever stored with a usable passphrase.
        atomic_write(self.passphrase_path, f"{secret}\n".encode(), 0o600)
        atomic_write(self.directory / ADDRESS_FILE, f"{where}\n".encode(), 0o600)
        _log.info("registered with the configuration server %s", where)
        return where
