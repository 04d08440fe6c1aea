"""Facts about the host an agent sends when it enrols (beside its disks)."""

from __future__ import annotations

import os
import re
from pathlib import Path

PRODUCT_UUID = Path("/sys/class/dmi/id/product_uuid")  # readable by root only
# Another file to read it from: tests (a host has one DMI UUID), and hosts whose
# firmware UUID is not the one vCenter shows.
PRODUCT_UUID_ENV = "SECONDSITE_PRODUCT_UUID_FILE"
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def bios_uuid(path: Path | None = None) -> str | None:
    """The SMBIOS system UUID, lower case; None on hosts without one (no DMI, not root,
    or the all-zero / all-F placeholder some firmware writes). On a VMware VM it is the
    VM's `config.uuid`: how the configuration server links the machine to its VM."""
    if path is None:
        path = Path(os.environ.get(PRODUCT_UUID_ENV) or PRODUCT_UUID)
    try:
        text = path.read_text().strip().lower()
    except OSError:
        return None
    digits = set(text.replace("-", ""))
    if not _UUID.fullmatch(text) or digits in ({"0"}, {"f"}):
        return None
    return text
