"""Discovery against a fake sysfs tree (every skip rule) and against real loop devices."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from agent.discovery import Disk, discover, refresh, skip_reason
from agent.errors import DeviceGone, DeviceResized
from tests.loopfs import loop_device, loop_ext4


def write_tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")


@pytest.fixture
def fake_host(tmp_path: Path) -> tuple[Path, Path]:
    """sda (SCSI, two partitions, LVM on sda2), an unbound loop, zram, a dm device and
    a hidden NVMe path: only sda is protectable. Returns (sys_root, mountinfo)."""
    sys_root = tmp_path / "sys"
    write_tree(
        sys_root / "block",
        {
            "sda/dev": "8:0",
            "sda/size": "2097152",  # 1 GiB in 512-byte units
            "sda/queue/logical_block_size": "512",
            "sda/queue/physical_block_size": "4096",
            "sda/queue/rotational": "0",
            "sda/ro": "0",
            "sda/removable": "0",
            "sda/diskseq": "4",
            "sda/device/model": "Virtual disk    ",
            "sda/device/vendor": "VMware  ",
            "sda/device/serial": "6000c29d",
            "sda/sda1/partition": "1",
            "sda/sda1/dev": "8:1",
            "sda/sda1/start": "2048",
            "sda/sda1/size": "1048576",
            "sda/sda2/partition": "2",
            "sda/sda2/dev": "8:2",
            "sda/sda2/start": "1050624",
            "sda/sda2/size": "1046528",
            "dm-0/dev": "253:0",
            "dm-0/size": "1046528",
            "loop5/dev": "7:5",
            "loop5/size": "0",
            "zram0/dev": "252:0",
            "zram0/size": "8192",
            "nvme0c0n1/dev": "259:1",
            "nvme0c0n1/size": "8192",
            "nvme0c0n1/hidden": "1",
        },
    )
    # sysfs links: sda2 is held by dm-0, dm-0's slave is sda2.
    (sys_root / "block/sda/sda2/holders").mkdir()
    (sys_root / "block/sda/sda2/holders/dm-0").symlink_to(sys_root / "block/dm-0")
    (sys_root / "block/dm-0/slaves").mkdir()
    (sys_root / "block/dm-0/slaves/sda2").symlink_to(sys_root / "block/sda/sda2")
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "1 0 253:0 / / rw,relatime shared:1 - ext4 /dev/mapper/vg-root rw\n"
        "2 1 8:1 / /boot\\040efi ro,relatime - vfat /dev/sda1 ro\n"
        "3 1 8:1 /grub /mnt/bind rw master:3 - vfat /dev/sda1 rw\n"
        "4 1 0:22 / /sys rw - sysfs sysfs rw\n"
        "5 1 7:5 / /mnt/other rw - ext4 /dev/loop5 rw\n"
    )
    return sys_root, mountinfo


def test_fake_host_only_the_real_disk_with_stacked_mounts(fake_host: tuple[Path, Path]) -> None:
    sys_root, mountinfo = fake_host
    disks = discover(sys_root, mountinfo)
    assert [d.name for d in disks] == ["sda"]
    (sda,) = disks
    assert (sda.path, sda.devno, sda.size) == (Path("/dev/sda"), "8:0", 1 << 30)
    assert (sda.logical_sector_size, sda.physical_sector_size) == (512, 4096)
    assert (sda.rotational, sda.read_only, sda.removable) == (False, False, False)
    assert (sda.model, sda.vendor, sda.serial, sda.backing_file) == (
        "Virtual disk",
        "VMware",
        "6000c29d",
        None,
    )
    assert [(p.name, p.start, p.size) for p in sda.partitions] == [
        ("sda1", 1 << 20, 512 << 20),
        ("sda2", 1050624 * 512, 1046528 * 512),
    ]
    # The LVM root on sda2 belongs to sda (quiesce must freeze it); the escaped space
    # and the bind mount come through; the loop5 mount belongs to no protectable disk.
    assert [(m.mount_point, m.device, m.fs_type, m.root, m.read_only) for m in sda.mounts] == [
        (Path("/"), "dm-0", "ext4", "/", False),
        (Path("/boot efi"), "sda1", "vfat", "/", True),
        (Path("/mnt/bind"), "sda1", "vfat", "/grub", False),
    ]
    as_json = json.loads(json.dumps(sda.as_dict()))
    assert as_json["devno"] == "8:0" and as_json["mounts"][1]["mount_point"] == "/boot efi"


def test_fake_host_skip_reasons(fake_host: tuple[Path, Path]) -> None:
    sys_root, _ = fake_host
    reasons = {
        name: skip_reason(sys_root, name) for name in ("sda", "dm-0", "loop5", "zram0", "nvme0c0n1")
    }
    assert reasons["sda"] is None
    assert "stacked" in str(reasons["dm-0"])
    assert "no medium" in str(reasons["loop5"])
    assert "memory" in str(reasons["zram0"])
    assert "hidden" in str(reasons["nvme0c0n1"])


def test_fake_host_refresh_reports_resize_and_new_medium(fake_host: tuple[Path, Path]) -> None:
    sys_root, mountinfo = fake_host
    (sda,) = discover(sys_root, mountinfo)
    assert refresh(sda, sys_root, mountinfo) == sda
    (sys_root / "block/sda/size").write_text("4194304\n")
    with pytest.raises(DeviceResized) as resized:
        refresh(sda, sys_root, mountinfo)
    assert (resized.value.old_size, resized.value.new_size) == (1 << 30, 2 << 30)
    (sys_root / "block/sda/diskseq").write_text("5\n")
    with pytest.raises(DeviceGone, match="different medium"):
        refresh(sda, sys_root, mountinfo)


@pytest.mark.root
def test_discovers_a_loop_disk_with_its_mount(tmp_path: Path) -> None:
    with loop_ext4(tmp_path, 16) as (device, mnt):
        disk = find(device)
        assert disk.size == 16 << 20
        assert disk.path == device and disk.major == 7
        assert disk.backing_file == str(tmp_path / "disk16.img")
        assert (disk.model, disk.serial) == (None, None)
        assert [(m.mount_point, m.fs_type, m.source) for m in disk.mounts] == [
            (mnt, "ext4", str(device))
        ]
        json.dumps(disk.as_dict())


def find(device: Path) -> Disk:
    matches = [d for d in discover() if d.path == device]
    assert len(matches) == 1, f"{device} not discovered"
    return matches[0]


@pytest.mark.root
def test_refresh_after_detach_raises_device_gone(tmp_path: Path) -> None:
    image = tmp_path / "gone.img"
    image.write_bytes(bytes(1 << 20))
    with loop_device(image) as device:
        disk = find(device)
        subprocess.run(["losetup", "-d", str(device)], check=True)
        with pytest.raises(DeviceGone) as gone:
            refresh(disk)
        assert gone.value.device == device.name


@pytest.mark.root
@pytest.mark.parametrize("new_mib", [3, 1], ids=["grow", "shrink"])
def test_refresh_after_resize_raises_device_resized(tmp_path: Path, new_mib: int) -> None:
    image = tmp_path / "resize.img"
    image.write_bytes(bytes(2 << 20))
    with loop_device(image) as device:
        disk = find(device)
        assert refresh(disk).size == 2 << 20
        subprocess.run(["truncate", "-s", f"{new_mib}M", str(image)], check=True)
        subprocess.run(["losetup", "-c", str(device)], check=True)
        with pytest.raises(DeviceResized) as resized:
            refresh(disk)
        assert (resized.value.old_size, resized.value.new_size) == (2 << 20, new_mib << 20)
