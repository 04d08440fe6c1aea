"""Loop devices with a mounted ext4 filesystem, made from image files."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from appliance.daemon.cli import Unavailable


def _run(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise Unavailable(f"{argv[0]} is not installed", "install util-linux / e2fsprogs") from None
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or exc.stdout or "").strip().splitlines()
        raise Unavailable(
            f"{' '.join(argv)} failed: {detail[-1] if detail else exc.returncode}",
            "are loop devices available here (modprobe loop)?",
        ) from None
    return done.stdout.strip()


def make_image(image: Path, size: int) -> None:
    with image.open("wb") as f:
        f.truncate(size)
    # Inode tables and journal initialised now: no ext4lazyinit writes in the background.
    _run(["mkfs.ext4", "-q", "-F", "-m", "0", "-E",
          "lazy_itable_init=0,lazy_journal_init=0", str(image)])  # fmt: skip


def attach(image: Path) -> str:
    # Two `losetup -f` running at once can pick the same free device and one of them
    # fails with EBUSY: try again a few times before calling it unavailable.
    for attempt in range(5):
        try:
            return _run(["losetup", "-f", "--show", str(image)])
        except Unavailable:
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def mount(device: str, mountpoint: Path) -> None:
    mountpoint.mkdir(parents=True, exist_ok=True)
    _run(["mount", device, str(mountpoint)])


def is_mounted(mountpoint: str) -> bool:
    target = os.path.realpath(mountpoint)
    with open("/proc/mounts") as f:
        return any(line.split()[1] == target for line in f if len(line.split()) > 1)


def backing_file(device: str) -> str | None:
    try:
        return (
            (Path("/sys/block") / Path(device).name / "loop" / "backing_file").read_text().strip()
        )
    except OSError:
        return None


def unmount(mountpoint: str) -> None:
    if not (mountpoint and is_mounted(mountpoint)):
        return
    if subprocess.run(["umount", mountpoint], check=False, capture_output=True).returncode:
        _run(["umount", "-l", mountpoint])


def detach(device: str, image: str) -> None:
    """Detach `device` only while it is still backed by our `image` (numbers get reused)."""
    if device and backing_file(device) == os.path.realpath(image):
        _run(["losetup", "-d", device])


def seed(mountpoint: Path, size: int) -> None:
    """Some initial files, so the initial sync has data: ~1/8 of the disk, at most 32 MiB,
    half random and half repetitive text."""
    total = min(size // 8, 32 << 20)
    data = mountpoint / "seed"
    data.mkdir(exist_ok=True)
    (data / "README").write_text("Files written by secondsite-lab up for the initial sync.\n")
    written, i = 0, 0
    while written < total:
        chunk = min(1 << 20, total - written)
        body = os.urandom(chunk) if i % 2 == 0 else (b"secondsite lab %08d\n" % i) * (chunk // 24)
        (data / f"file{i:04d}.bin").write_bytes(body)
        written += chunk
        i += 1
    os.sync()
