"""The SSH_ASKPASS helper: a two-line script that prints the secret from its own
environment (the ssh client's, which the engine sets for that one process).

The script holds no secret, so it may live on disk: it is written once per process
into a private 0700 directory, and again if something (tmpfiles cleaning) removed it."""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

SECRET_ENV = "SECONDSITE_PUSH_SECRET"
SCRIPT = f"#!/bin/sh\nprintf '%s\\n' \"${SECRET_ENV}\"\n"

_lock = threading.Lock()
_path: Path | None = None


def helper() -> Path:
    """The helper's path, written first if missing."""
    global _path  # noqa: PLW0603 - one helper per process
    with _lock:
        if _path is None or not _path.is_file():
            directory = Path(tempfile.mkdtemp(prefix="secondsite-askpass."))  # mode 0700
            path = directory / "askpass"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700)
            with os.fdopen(fd, "w") as out:
                out.write(SCRIPT)
            _path = path
        return _path
