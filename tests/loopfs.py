"""A small real ext4 filesystem on a loop device, for tests that fill a disk."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
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
