"""Replica disks as monolithicFlat VMDKs that ESXi/vCenter can attach at failover.

On-disk format (one pair per disk)::

    <dir>/<name>.vmdk          text descriptor, written atomically, never replaced
    <dir>/<name>-flat.vmdk     raw disk image: exactly <size> bytes, created sparse
                               (ftruncate), sector i at byte offset 512*i

The descriptor (VMware "Virtual Disk Format 1.1", monolithicFlat)::

    # Disk DescriptorFile
    version=1
    encoding="UTF-8"
    CID=<8 hex digits, random>
    parentCID=ffffffff
    createType="monolithicFlat"

    # Extent description
    RW <size/512> FLAT "<name>-flat.vmdk" 0

    # The Disk Data Base
    #DDB

    ddb.adapterType = "lsilogic"
    ddb.geometry.cylinders = "<sectors / (255*63), at least 1, at most 65535>"
    ddb.geometry.heads = "255"
    ddb.geometry.sectors = "63"
    ddb.uuid = "<16 hex bytes, space separated, '-' after the 8th>"
    ddb.virtualHWVersion = "14"

Replica disks of the master target live at ``<datastore>/<disk_id>/<disk_id>.vmdk``;
materialised copies are pairs created directly in the caller's output directory.
Names are single safe path components and existing files are never overwritten.
"""

from __future__ import annotations

import os
import re
import secrets
import uuid
from dataclasses import dataclass
from pathlib import Path

from appliance.storage.atomic import atomic_write, fsync_dir
from appliance.target.errors import AlreadyExists, InvalidDescriptor, InvalidName, InvalidSize

SECTOR = 512
ADAPTER_TYPE = "lsilogic"
VIRTUAL_HW_VERSION = 14
_HEADS = 255
_SECTORS_PER_TRACK = 63
_MAX_CYLINDERS = 65535
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_EXTENT_RE = re.compile(r'^RW\s+(\d+)\s+FLAT\s+"([^"/\\]+)"\s+0\s*$')
_MAX_DESCRIPTOR = 64 << 10


def validate_name(name: str) -> str:
    """Return ``name`` if it is a safe file-name stem, else raise InvalidName."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidName(
            f"invalid name {name!r}: use 1-64 of A-Z a-z 0-9 . _ -, starting with a "
            "letter or digit, without '..'"
        )
    return name


def validate_size(size: int) -> int:
    """Return ``size`` if it is a positive multiple of 512 bytes, else raise InvalidSize."""
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % SECTOR:
        raise InvalidSize(f"disk size must be a positive multiple of {SECTOR} bytes, got {size!r}")
    return size


def _inside(directory: Path, child: Path) -> Path:
    """``child`` resolved; InvalidName if that escapes ``directory`` (e.g. via a symlink)."""
    root = directory.resolve()
    resolved = child.resolve()
    if root not in resolved.parents:
        raise InvalidName(f"{child} resolves outside {root}")
    return resolved


@dataclass(frozen=True)
class VmdkPaths:
    """A descriptor and its flat extent."""

    descriptor: Path
    flat: Path


@dataclass(frozen=True)
class VmdkDescriptor:
    """What this engine reads back from a descriptor."""

    size: int
    flat_name: str
    adapter_type: str
    uuid: str


def paths(directory: Path, name: str) -> VmdkPaths:
    """The descriptor and flat paths of disk ``name`` in ``directory`` (validated)."""
    validate_name(name)
    descriptor = _inside(directory, directory / f"{name}.vmdk")
    flat = _inside(directory, directory / f"{name}-flat.vmdk")
    return VmdkPaths(descriptor, flat)


def _ddb_uuid() -> str:
    raw = uuid.uuid4().bytes
    first = " ".join(f"{b:02x}" for b in raw[:8])
    second = " ".join(f"{b:02x}" for b in raw[8:])
    return f"{first}-{second}"


def render_descriptor(name: str, size: int, disk_uuid: str | None = None) -> str:
    """The descriptor text for a monolithicFlat disk of ``size`` bytes."""
    validate_name(name)
    sectors = validate_size(size) // SECTOR
    cylinders = max(1, min(_MAX_CYLINDERS, sectors // (_HEADS * _SECTORS_PER_TRACK)))
    return (
        "# Disk DescriptorFile\n"
        "version=1\n"
        'encoding="UTF-8"\n'
        f"CID={secrets.randbits(32):08x}\n"
        "parentCID=ffffffff\n"
        'createType="monolithicFlat"\n'
        "\n"
        "# Extent description\n"
        f'RW {sectors} FLAT "{name}-flat.vmdk" 0\n'
        "\n"
        "# The Disk Data Base\n"
        "#DDB\n"
        "\n"
        f'ddb.adapterType = "{ADAPTER_TYPE}"\n'
        f'ddb.geometry.cylinders = "{cylinders}"\n'
        f'ddb.geometry.heads = "{_HEADS}"\n'
        f'ddb.geometry.sectors = "{_SECTORS_PER_TRACK}"\n'
        f'ddb.uuid = "{disk_uuid or _ddb_uuid()}"\n'
        f'ddb.virtualHWVersion = "{VIRTUAL_HW_VERSION}"\n'
    )


def parse_descriptor(text: str) -> VmdkDescriptor:
    """Parse a monolithicFlat descriptor with a single flat extent."""
    fields: dict[str, str] = {}
    extents: list[tuple[int, str]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _EXTENT_RE.match(line)
        if match:
            extents.append((int(match.group(1)), match.group(2)))
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise InvalidDescriptor(f"unparseable descriptor line {raw!r}")
        fields[key.strip()] = value.strip().strip('"')
    if fields.get("version") != "1" or fields.get("createType") != "monolithicFlat":
        raise InvalidDescriptor("not a version=1 monolithicFlat descriptor")
    if len(extents) != 1 or extents[0][0] <= 0:
        raise InvalidDescriptor(f"expected exactly one non-empty FLAT extent, found {extents}")
    sectors, flat_name = extents[0]
    return VmdkDescriptor(
        size=sectors * SECTOR,
        flat_name=flat_name,
        adapter_type=fields.get("ddb.adapterType", ""),
        uuid=fields.get("ddb.uuid", ""),
    )


def read_descriptor(path: Path) -> VmdkDescriptor:
    """Read and parse the descriptor at ``path``."""
    with open(path, "rb") as f:
        data = f.read(_MAX_DESCRIPTOR + 1)
    if len(data) > _MAX_DESCRIPTOR:
        raise InvalidDescriptor(f"{path}: too large for a descriptor")
    try:
        return parse_descriptor(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InvalidDescriptor(f"{path}: not UTF-8 text") from exc


def create(directory: Path, name: str, size: int) -> VmdkPaths:
    """Create the pair for disk ``name`` in the existing ``directory``.

    The flat file is created first (O_EXCL, sparse, fsync'ed), then the descriptor
    (exclusive link of a synced temp file), so a descriptor never points at a missing
    extent. If either name is taken, AlreadyExists and nothing of ours is left behind.
    """
    validate_size(size)
    pair = paths(directory, name)
    try:
        fd = os.open(pair.flat, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError as exc:
        raise AlreadyExists(f"{pair.flat} already exists") from exc
    try:
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)
        atomic_write(pair.descriptor, render_descriptor(name, size).encode(), exclusive=True)
    except FileExistsError as exc:
        pair.flat.unlink()
        raise AlreadyExists(f"{pair.descriptor} already exists") from exc
    except BaseException:
        pair.flat.unlink(missing_ok=True)
        raise
    fsync_dir(directory)
    return pair


def replica_paths(datastore: Path, disk_id: str) -> VmdkPaths:
    """Where the replica of ``disk_id`` lives: ``<datastore>/<disk_id>/<disk_id>.vmdk``."""
    validate_name(disk_id)
    return paths(_inside(datastore, datastore / disk_id), disk_id)


def create_replica(datastore: Path, disk_id: str, size: int) -> VmdkPaths:
    """Create the replica pair of ``disk_id`` (and its directory) in ``datastore``."""
    validate_name(disk_id)
    validate_size(size)
    disk_dir = _inside(datastore, datastore / disk_id)
    created_dir = not disk_dir.exists()
    disk_dir.mkdir(mode=0o755, exist_ok=True)
    if created_dir:
        fsync_dir(datastore)
    return create(disk_dir, disk_id, size)
