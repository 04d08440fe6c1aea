"""The OVF environment on a CD-ROM: OVF 1.1's ISO transport, read without mounting.

With `ovf:transport="iso"` (image/secondsite.ovf.in) vSphere attaches an ISO 9660 image
holding `ovf-env.xml` to the VM's CD-ROM drive. Reading the file straight from the
device needs no mount (the first-boot unit has no mount rights outside its own
namespace, and the isofs module may not be loaded) and no filesystem driver at all:
the root directory of an ISO 9660 volume is a few fixed-layout records.

The name is matched in the three ways ISO writers store it: the ISO 9660 name
(`OVF_ENV.XML;1`, d-characters only), the Rock Ridge NM entry, and the Joliet volume
(UCS-2). Only the root directory is searched: that is where the transport puts it.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

_log = logging.getLogger(__name__)

ENV_NAME = "ovf-env.xml"
SECTOR = 2048
FIRST_DESCRIPTOR = 16  # sectors 0-15 are the system area
MAX_DESCRIPTORS = 32  # a real volume has 2-4; a loop here means garbage
MAX_DIRECTORY = 1 << 20
MAX_FILE = 1 << 20  # vSphere's environments are a few KiB; ovfenv refuses more anyway
JOLIET_ESCAPES = (b"%/@", b"%/C", b"%/E")
SYS_BLOCK = Path("/sys/class/block")
# Nothing in a drive, or no drive behind the node: "no environment here", not an error.
NO_MEDIUM = {errno.ENOMEDIUM, errno.ENXIO, errno.ENODEV, errno.ENOENT, errno.EIO}


class IsoError(Exception):
    """The medium is not an ISO 9660 volume, or its structures are inconsistent."""


def cdrom_devices(sys_block: Path = SYS_BLOCK) -> list[Path]:
    """The SCSI/ATAPI CD-ROM drives (`sr*`), in the kernel's order."""
    try:
        names = [p.name for p in sys_block.iterdir() if p.name.startswith("sr")]
    except FileNotFoundError:
        return []
    return [Path("/dev") / n for n in sorted(names, key=lambda n: (len(n), n))]


def find_environment(devices: Iterable[Path]) -> tuple[Path, str] | None:
    """The first device holding ovf-env.xml, with its text; None if none does.

    A drive without a medium, or with a disc that is not ISO 9660 or has no
    ovf-env.xml, is logged and skipped: the next one may be the transport's."""
    for device in devices:
        try:
            text = read_environment(device)
        except IsoError as exc:
            _log.info("%s: %s", device, exc)
            continue
        if text is None:
            _log.info("%s: no %s on it", device, ENV_NAME)
            continue
        return device, text
    return None


def read_environment(path: Path) -> str | None:
    """ovf-env.xml from the ISO 9660 volume at `path` (a device or an image file);
    None when there is no medium or the volume has no such file."""
    try:
        # O_NONBLOCK: opening an empty CD-ROM drive must fail, not wait for a disc.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in NO_MEDIUM:
            _log.info("%s: no medium (%s)", path, exc.strerror)
            return None
        raise IsoError(f"cannot open: {exc.strerror or exc}") from None
    try:
        return _Volume(fd).read_root_file(ENV_NAME)
    except OSError as exc:
        if exc.errno in NO_MEDIUM:
            _log.info("%s: no medium (%s)", path, exc.strerror)
            return None
        raise IsoError(f"cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def _le32(data: bytes, offset: int) -> int:
    return int.from_bytes(data[offset : offset + 4], "little")


class _Volume:
    def __init__(self, fd: int) -> None:
        self._fd = fd

    def _read(self, offset: int, size: int) -> bytes:
        data = os.pread(self._fd, size, offset)
        if len(data) != size:
            raise IsoError(f"truncated volume: {size} bytes at {offset} are not there")
        return data

    def read_root_file(self, wanted: str) -> str | None:
        primary, joliet = self._descriptors()
        # Joliet first: its names are the real ones; the primary names may be mangled.
        for descriptor, is_joliet in ((joliet, True), (primary, False)):
            if descriptor is None:
                continue
            for name, extent, size in self._root_entries(descriptor, is_joliet):
                if _normalized(name) == wanted:
                    if size > MAX_FILE:
                        raise IsoError(f"{name} is {size} bytes, more than {MAX_FILE}")
                    data = self._read(extent * SECTOR, size)
                    try:
                        return data.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        raise IsoError(f"{name} is not UTF-8: {exc}") from None
        return None

    def _descriptors(self) -> tuple[bytes, bytes | None]:
        primary = joliet = None
        for index in range(FIRST_DESCRIPTOR, FIRST_DESCRIPTOR + MAX_DESCRIPTORS):
            block = self._read(index * SECTOR, SECTOR)
            if block[1:6] != b"CD001":
                raise IsoError("not an ISO 9660 volume (no CD001 volume descriptor)")
            kind = block[0]
            if kind == 255:  # terminator
                break
            if kind == 1 and primary is None:
                primary = block
            elif kind == 2 and block[88:91] in JOLIET_ESCAPES and joliet is None:
                joliet = block
        else:
            raise IsoError("no volume descriptor set terminator")
        if primary is None:
            raise IsoError("no primary volume descriptor")
        return primary, joliet

    def _root_entries(self, descriptor: bytes, joliet: bool) -> Iterator[tuple[str, int, int]]:
        root = descriptor[156 : 156 + 34]
        extent, size = _le32(root, 2), _le32(root, 10)
        if size > MAX_DIRECTORY:
            raise IsoError(f"root directory of {size} bytes")
        directory = self._read(extent * SECTOR, size)
        offset = 0
        while offset < len(directory):
            length = directory[offset]
            if length == 0:  # records never span sectors: the rest of this one is padding
                offset = (offset // SECTOR + 1) * SECTOR
                continue
            record = directory[offset : offset + length]
            if length < 34 or len(record) < length:
                raise IsoError(f"bad directory record at offset {offset}")
            offset += length
            flags, name_length = record[25], record[32]
            raw = record[33 : 33 + name_length]
            if flags & 0x02 or raw in (b"\x00", b"\x01"):  # directories, "." and ".."
                continue
            if joliet:
                name = raw.decode("utf-16-be", errors="replace")
            else:
                system_use = record[33 + name_length + (1 - name_length % 2) :]
                name = _rock_ridge_name(system_use) or raw.decode("ascii", errors="replace")
            yield name, _le32(record, 2), _le32(record, 10)


def _rock_ridge_name(system_use: bytes) -> str | None:
    """The name of a Rock Ridge NM entry (SUSP: signature, length, version, data)."""
    parts = []
    offset = 0
    while offset + 4 <= len(system_use):
        signature, length = system_use[offset : offset + 2], system_use[offset + 2]
        if length < 4:
            break
        if signature == b"NM" and length >= 5:
            parts.append(system_use[offset + 5 : offset + length])
        offset += length
    if not parts:
        return None
    return b"".join(parts).decode("utf-8", errors="replace")


def _normalized(name: str) -> str:
    """`OVF_ENV.XML;1` and `ovf-env.xml` alike: ISO 9660 level 1 has no '-' and no
    lower case, and adds a version."""
    return name.split(";", 1)[0].rstrip(".").lower().replace("_", "-")
