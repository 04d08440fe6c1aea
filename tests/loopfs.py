"""A small real ext4 filesystem on a loop device, for tests that fill a disk."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_ext4(directory: Path, mib: int) -> Iterator[Path]:
    """Mount a fresh `mib` MiB ext4 at directory/mnt; unmounted and detached afterwards,
    whatever happens (a test that fails mid-way must not leak loop devices)."""
    if os.geteuid() != 0 or not shutil.which("mkfs.ext4") or not shutil.which("losetup"):
        pytest.skip("needs root, mkfs.ext4 and losetup")
    image = directory / f"fs{mib}.img"
    with open(image, "wb") as f:
        f.truncate(mib << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True)
    device = subprocess.run(
        ["losetup", "-f", "--show", str(image)], check=True, capture_output=True, text=True
    ).stdout.strip()
    mnt = directory / "mnt"
    mnt.mkdir(exist_ok=True)
    mounted = False
    try:
        subprocess.run(["mount", device, str(mnt)], check=True)
        mounted = True
        yield mnt
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(mnt)], check=True)
        subprocess.run(["losetup", "-d", device], check=True)


def _require_loop_tools() -> None:
    if os.geteuid() != 0 or not shutil.which("mkfs.ext4") or not shutil.which("losetup"):
        pytest.skip("needs root, mkfs.ext4 and losetup")


def _backing_file(device: Path) -> str | None:
    try:
        return (Path("/sys/block") / device.name / "loop" / "backing_file").read_text().strip()
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def loop_device(image: Path) -> Iterator[Path]:
    """Attach `image` to a free loop device; detached afterwards unless the test already
    did. The test may detach it itself (to see a device vanish): then the number may be
    reused by someone else at once, so the cleanup detaches only while the device is
    still backed by `image`."""
    _require_loop_tools()
    device = Path(
        subprocess.run(
            ["losetup", "-f", "--show", str(image)], check=True, capture_output=True, text=True
        ).stdout.strip()
    )
    try:
        yield device
    finally:
        if _backing_file(device) == str(image.resolve()):
            subprocess.run(["losetup", "-d", str(device)], check=True)


@contextlib.contextmanager
def loop_ext4(directory: Path, mib: int) -> Iterator[tuple[Path, Path]]:
    """A fresh `mib` MiB ext4 image on a loop device, mounted at directory/mnt:
    (device, mountpoint). Inode tables and journal are initialised by mkfs, so an idle
    filesystem does not write in the background (ext4lazyinit) while a test watches."""
    _require_loop_tools()
    image = directory / f"disk{mib}.img"
    with open(image, "wb") as f:
        f.truncate(mib << 20)
    subprocess.run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-m",
            "0",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            str(image),
        ],
        check=True,
    )
    mnt = directory / "mnt"
    mnt.mkdir(exist_ok=True)
    with loop_device(image) as device:
        mounted = False
        try:
            subprocess.run(["mount", str(device), str(mnt)], check=True)
            mounted = True
            yield device, mnt
        finally:
            if mounted:
                subprocess.run(["umount", "-l", str(mnt)], check=True)


def remount_read_only(mountpoint: Path) -> None:
    # EBUSY while the agent holds its freeze for a tag: that lasts under a second.
    for _ in range(20):
        done = subprocess.run(["mount", "-o", "remount,ro", str(mountpoint)],
                              check=False, capture_output=True, text=True)  # fmt: skip
        if done.returncode == 0:
            return
        time.sleep(0.25)
    raise AssertionError(f"remount,ro of {mountpoint} failed: {done.stderr}")
