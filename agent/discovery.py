"""Block-device discovery from sysfs and mountinfo: the whole disks a host could protect.

Read-only and cheap (a few hundred small sysfs reads); no udev, no lsblk, no ioctl,
so it works in minimal hosts and against a fake tree in tests (`sys_root`,
`mountinfo`). Sizes in sysfs are always in 512-byte units, whatever the sector size.

What is skipped, and why (`skip_reason`):
- ``ram*``, ``zram*``: memory-backed (swap, caches), nothing to recover;
- ``fd*``, ``sr*``: floppy and optical drives, removable media, not server disks;
- devices with slaves (``dm-*``, ``md*``): stacked on other disks. The agent protects
  the disks underneath (one copy of each written block), and the mounts of a stacked
  device are reported on the disks below it, so quiesce still freezes them;
- hidden devices (NVMe multipath paths): the visible head device is reported instead;
- size 0: nothing attached (an unbound loop device, an empty drive).
"""

from __future__ import annotations

import dataclasses
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import DeviceGone, DeviceResized

SECTOR = 512  # sysfs `size` and `start` unit, fixed by the kernel ABI
_SKIPPED_PREFIXES = ("ram", "zram", "fd", "sr")
_MAX_STACK = 8  # holder chains deeper than this are a loop in a broken tree


@dataclass(frozen=True)
class Mount:
    """One mountinfo line whose source is the disk, a partition, or a device above them."""

    mount_point: Path
    fs_type: str
    source: str  # as mounted, e.g. /dev/loop3, /dev/mapper/vg-root
    device: str  # kernel name of the mounted block device (loop3, sda1, dm-0)
    root: str  # subtree of the filesystem mounted here; "/" unless a bind mount
    read_only: bool


@dataclass(frozen=True)
class Partition:
    name: str
    major: int
    minor: int
    start: int  # bytes from the start of the disk
    size: int  # bytes


@dataclass(frozen=True)
class Disk:
    """A whole disk as the kernel sees it at discovery time."""

    name: str
    path: Path
    major: int
    minor: int
    size: int  # bytes
    logical_sector_size: int
    physical_sector_size: int
    rotational: bool
    read_only: bool
    removable: bool
    model: str | None = None
    vendor: str | None = None  # as sysfs has it: a name for SCSI, a PCI id for virtio
    serial: str | None = None
    backing_file: str | None = None  # loop devices only
    diskseq: int | None = None  # kernel attach sequence (5.15+): changes with the medium
    partitions: tuple[Partition, ...] = ()
    mounts: tuple[Mount, ...] = ()

    @property
    def devno(self) -> str:
        return f"{self.major}:{self.minor}"

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON types only (paths as strings), for `--json` and status files."""
        return _jsonable(dataclasses.asdict(self)) | {"devno": self.devno}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _read(path: Path) -> str | None:
    """A sysfs attribute, stripped; None when absent or unreadable on this kernel/driver."""
    try:
        return path.read_text().strip()
    except OSError:
        # Missing on this kernel or driver, or the device went away mid-read (some
        # drivers fail reads of attributes they list with EIO/ENXIO): both mean "unknown".
        return None


def _read_int(path: Path, default: int = 0) -> int:
    text = _read(path)
    return int(text) if text else default


def _devno(text: str | None) -> tuple[int, int] | None:
    if not text or ":" not in text:
        return None
    major, minor = text.split(":", 1)
    return int(major), int(minor)


def skip_reason(sys_root: Path, name: str) -> str | None:
    """Why /sys/block/`name` is not a protectable whole disk, or None when it is."""
    block = sys_root / "block" / name
    if name.startswith(_SKIPPED_PREFIXES):
        return "memory-backed or removable-media device"
    if any((block / "slaves").glob("*")):
        return "stacked on other disks (protect the disks underneath)"
    if _read(block / "hidden") == "1":
        return "hidden multipath path"
    if _read_int(block / "size") == 0:
        return "no medium attached"
    return None


def discover(
    sys_root: Path = Path("/sys"),
    mountinfo: Path = Path("/proc/self/mountinfo"),
    dev_root: Path = Path("/dev"),
) -> list[Disk]:
    """The host's protectable whole disks, sorted by name (see the module doc for skips)."""
    block_dir = sys_root / "block"
    mounts = _parse_mountinfo(mountinfo)
    disks = []
    for entry in sorted(block_dir.iterdir(), key=lambda p: p.name):
        if skip_reason(sys_root, entry.name) is None:
            disk = _read_disk(sys_root, entry.name, dev_root, mounts)
            # Detached between the two reads (loop devices come and go): skip it too.
            if disk is not None and disk.size > 0:
                disks.append(disk)
    return disks


def disk_identity(disk: Disk) -> str:
    """What tells this disk from another one behind the same kernel name after a
    reboot: its serial number (with vendor and model), or a loop device's backing file.
    Empty when the kernel shows neither (a VMware disk without disk.EnableUUID): then
    the name and the size are all there is."""
    if disk.serial:
        return f"serial:{disk.vendor or ''}:{disk.model or ''}:{disk.serial}"
    if disk.backing_file:
        return f"file:{disk.backing_file.removesuffix(' (deleted)')}"
    return ""


def refresh(
    disk: Disk,
    sys_root: Path = Path("/sys"),
    mountinfo: Path = Path("/proc/self/mountinfo"),
    dev_root: Path = Path("/dev"),
) -> Disk:
    """`disk` as it is now: DeviceGone if it went away or is another medium behind the
    same name, DeviceResized if its size changed; otherwise the fresh record (partitions
    and mounts may have changed, which is not an error)."""
    fresh = _read_disk(sys_root, disk.name, dev_root, _parse_mountinfo(mountinfo))
    if fresh is None:
        raise DeviceGone(disk.name, "no longer in /sys/block")
    if (fresh.major, fresh.minor) != (disk.major, disk.minor):
        raise DeviceGone(disk.name, f"now {fresh.devno}, was {disk.devno}")
    if fresh.size == 0 or (disk.backing_file is not None and fresh.backing_file is None):
        raise DeviceGone(disk.name, "no medium attached")
    # The same major:minor can be a different medium: a loop device detached and
    # re-attached by someone else, a hot-swapped drive. diskseq says so (kernel 5.15+);
    # before it, a loop device's backing file is the best evidence. (A deleted backing
    # file shows as "PATH (deleted)" but is still the same open file.)
    if disk.diskseq is not None and fresh.diskseq is not None:
        if fresh.diskseq != disk.diskseq:
            raise DeviceGone(
                disk.name, f"different medium (diskseq {fresh.diskseq}, was {disk.diskseq})"
            )
    elif _undeleted(disk.backing_file) != _undeleted(fresh.backing_file):
        raise DeviceGone(disk.name, f"now backed by {fresh.backing_file}")
    if fresh.size != disk.size:
        raise DeviceResized(disk.name, disk.size, fresh.size)
    return fresh


def _undeleted(backing_file: str | None) -> str | None:
    return backing_file.removesuffix(" (deleted)") if backing_file else backing_file


def _read_disk(sys_root: Path, name: str, dev_root: Path, mounts: list[_MountLine]) -> Disk | None:
    block = sys_root / "block" / name
    devno = _devno(_read(block / "dev"))
    if devno is None:
        return None  # vanished between listing and reading
    queue = block / "queue"
    device = block / "device"
    partitions = _partitions(block)
    # Mounts of the disk, its partitions, and anything stacked on them (LVM, crypt).
    members = {devno: name} | {(p.major, p.minor): p.name for p in partitions}
    for part_dir in [block, *(block / p.name for p in partitions)]:
        members |= _holders(sys_root, part_dir)
    diskseq = _read(block / "diskseq")
    return Disk(
        name=name,
        path=dev_root / name,
        major=devno[0],
        minor=devno[1],
        size=_read_int(block / "size") * SECTOR,
        logical_sector_size=_read_int(queue / "logical_block_size", SECTOR),
        physical_sector_size=_read_int(queue / "physical_block_size", SECTOR),
        rotational=_read(queue / "rotational") == "1",
        read_only=_read(block / "ro") == "1",
        removable=_read(block / "removable") == "1",
        model=_read(device / "model") or None,
        vendor=_read(device / "vendor") or None,
        serial=_read(block / "serial") or _read(device / "serial") or None,
        backing_file=_read(block / "loop" / "backing_file") or None,
        diskseq=int(diskseq) if diskseq else None,
        partitions=tuple(partitions),
        mounts=tuple(
            Mount(
                mount_point=line.mount_point,
                fs_type=line.fs_type,
                source=line.source,
                device=members[line.devno],
                root=line.root,
                read_only=line.read_only,
            )
            for line in mounts
            if line.devno in members
        ),
    )


def _partitions(block: Path) -> list[Partition]:
    found = []
    for child in sorted(block.iterdir(), key=lambda p: p.name):
        if not (child / "partition").exists():
            continue
        devno = _devno(_read(child / "dev"))
        if devno is None:
            continue
        found.append(
            Partition(
                name=child.name,
                major=devno[0],
                minor=devno[1],
                start=_read_int(child / "start") * SECTOR,
                size=_read_int(child / "size") * SECTOR,
            )
        )
    return found


def _holders(sys_root: Path, device_dir: Path, depth: int = 0) -> dict[tuple[int, int], str]:
    """Devices stacked on `device_dir`, transitively: {major:minor: name}."""
    found: dict[tuple[int, int], str] = {}
    if depth >= _MAX_STACK:
        return found
    holders = device_dir / "holders"
    if not holders.is_dir():
        return found
    for holder in holders.iterdir():
        upper = sys_root / "block" / holder.name
        devno = _devno(_read(upper / "dev"))
        if devno is not None:
            found[devno] = holder.name
            found |= _holders(sys_root, upper, depth + 1)
    return found


@dataclass(frozen=True)
class _MountLine:
    devno: tuple[int, int]
    root: str
    mount_point: Path
    fs_type: str
    source: str
    read_only: bool


def _unescape(field: str) -> str:
    r"""mountinfo escapes space, tab, newline and backslash as \ooo octal."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit() and i + 4 <= len(field):
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _parse_mountinfo(path: Path) -> list[_MountLine]:
    """proc(5): ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPER.

    Mounts are matched by MAJ:MIN. Filesystems with anonymous device numbers (btrfs,
    0:N) are also matched when their source path is a block device node.
    """
    lines = []
    for raw in path.read_text().splitlines():
        fields = raw.split(" ")
        try:
            sep = fields.index("-", 6)
        except ValueError:
            continue  # not a mountinfo line; proc(5) guarantees the separator
        devno = _devno(fields[2])
        source = _unescape(fields[sep + 2]) if len(fields) > sep + 2 else ""
        if devno is None:
            continue
        if devno[0] == 0 and source.startswith("/"):
            devno = _source_devno(source) or devno
        lines.append(
            _MountLine(
                devno=devno,
                root=_unescape(fields[3]),
                mount_point=Path(_unescape(fields[4])),
                fs_type=fields[sep + 1],
                source=source,
                read_only="ro" in fields[5].split(","),
            )
        )
    return lines


def _source_devno(source: str) -> tuple[int, int] | None:
    try:
        st = os.stat(source)
    except OSError:
        return None
    if not stat.S_ISBLK(st.st_mode):
        return None
    return os.major(st.st_rdev), os.minor(st.st_rdev)
