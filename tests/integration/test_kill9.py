"""kill -9 of each pipeline component mid-stream: the recovery points stay exact.

For each of the agent, the process server and the master target: the lab brings up the
real chain on a loop ext4 disk, a writer puts known data into the mounted filesystem,
the component is SIGKILLed while the writes continue and started again the way the lab
started it. Once a point taken after the restart exists, the writes stop and the
filesystem is remounted read-only; the newest point taken after that must materialise
to the source device bit for bit, and fsck clean.

Why read-only rather than `sync` + compare: ext4 rewrites its superblock on every
FITHAW (and FIFREEZE), so after each of the agent's tags the thawed device no longer
equals the point just taken. A read-only ext4 is frozen and thawed without any write,
so every point taken after the remount equals the device as it stands.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from appliance.lab.agent import start_agent
from appliance.lab.procs import alive, spawn
from appliance.lab.state import LabState, Proc
from tests.loopfs import remount_read_only

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.slow]

SIZE = "64M"
WRITE_RATE = 3e6  # bytes/s from the writer: enough to keep every stage busy
POINT_TIMEOUT = 45.0  # tag_interval is 5 s in the lab, and a restart reconnects with backoff


def lab(state: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "appliance.lab", "--state-dir", str(state), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert not check or done.returncode == 0, f"lab {args[0]}: {done.stderr}"
    return done


def lab_up(state: Path) -> None:
    lab(state, "up", "--size", SIZE)


def lab_json(state: Path, *args: str) -> Any:
    return json.loads(lab(state, *args, "--json").stdout)


def points_after(state: Path, after_ns: int) -> list[dict[str, Any]]:
    return [p for p in lab_json(state, "points") if int(p["time_ns"]) > after_ns]


def wait_points_after(state: Path, after_ns: int, count: int, what: str) -> list[dict[str, Any]]:
    deadline = time.monotonic() + POINT_TIMEOUT
    while len(found := points_after(state, after_ns)) < count:
        assert time.monotonic() < deadline, f"no {count} points {what}: " + logs_tail(state)
        time.sleep(0.5)
    return found


def logs_tail(state: Path) -> str:
    parts = []
    for log in sorted((state / "logs").glob("*.log")):
        parts.append(f"--- {log.name}\n" + log.read_text(errors="replace")[-1500:])
    return "\n".join(parts)


def device_sha256(device: str) -> str:
    """O_DIRECT: a buffered read could be served stale from the block device's cache,
    which the filesystem's data writes bypass."""
    digest = hashlib.sha256()
    buffer = mmap.mmap(-1, 1 << 20)  # page aligned, as O_DIRECT wants
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
    try:
        while (n := os.readv(fd, [buffer])) > 0:
            digest.update(buffer[:n])
    finally:
        os.close(fd)
        buffer.close()
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def thaw(mountpoint: Path) -> None:
    """A kill -9 inside the agent's freeze leaves the filesystem frozen: thaw it (an
    error just means it was not frozen)."""
    subprocess.run(["fsfreeze", "-u", str(mountpoint)], check=False, capture_output=True)


class Writer(threading.Thread):
    """Known data (seeded pseudo-random, half compressible), fsynced file by file, into
    a bounded set of files overwritten in place and recreated, at about WRITE_RATE."""

    def __init__(self, mnt: Path) -> None:
        super().__init__(daemon=True)
        self.dir = mnt / "known"
        self.dir.mkdir(exist_ok=True)
        self.halt = threading.Event()
        self.written = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        rng = random.Random(9)
        try:
            n = 0
            while not self.halt.is_set():
                size = 4096 * rng.randrange(1, 128)
                body = rng.randbytes(size // 2) + bytes([n % 256]) * (size - size // 2)
                path = self.dir / f"f{n % 24:02d}"
                if n % 5 == 0:
                    path.unlink(missing_ok=True)  # frees and reallocates blocks too
                with path.open("r+b" if path.exists() else "wb") as f:
                    f.seek(rng.randrange(0, 64) * 4096)
                    f.write(body)
                    f.flush()
                    os.fsync(f.fileno())
                self.written += size
                n += 1
                time.sleep(size / WRITE_RATE)
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=30)
        assert not self.is_alive(), "the writer is stuck (a frozen filesystem?)"
        assert self.error is None, f"the writer failed: {self.error!r}"


def restart_notified(old: Proc, notify: Path, timeout: float = 60.0) -> Proc:
    """Start `old`'s command line again and wait for READY=1, as the lab's
    start_notified does, but judging exit by waitpid on our own child rather than by
    /proc/PID/cmdline (which races with exec, see lab_up)."""
    notify.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.settimeout(0.5)
    try:
        new = spawn(old.name, old.argv, Path(old.log), {"NOTIFY_SOCKET": str(notify)})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, _ = os.waitpid(new.pid, os.WNOHANG)
            assert pid == 0, f"{old.name} exited at restart: " + Path(old.log).read_text()[-2000:]
            try:
                if "READY=1" in sock.recv(4096).decode().splitlines():
                    return new
            except TimeoutError:
                continue
        raise AssertionError(f"{old.name} not ready {timeout:.0f} s after its restart")
    finally:
        sock.close()
        notify.unlink(missing_ok=True)


def kill9_and_restart(state: Path, victim: str) -> None:
    """SIGKILL `victim`, then start it again with the lab's own command line and log, and
    record the new pid in lab.json (so `lab down` stops it)."""
    recorded = LabState.load(state.resolve())
    assert recorded is not None
    old = recorded.procs[victim]
    assert alive(old), f"{victim} was not running before the kill"
    os.kill(old.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while alive(old):
        assert time.monotonic() < deadline, f"{victim} survived SIGKILL"
        time.sleep(0.05)
    if victim == "agent":
        for disk in recorded.disks:
            thaw(Path(disk.mount))
        time.sleep(1.0)  # the writes go on without an agent for a while
        new = start_agent(state.resolve() / "agent.toml", Path(old.log))
    else:
        time.sleep(1.0)  # the upstream side queues and retries meanwhile
        new = restart_notified(old, state.resolve() / f"notify-{victim}")
    recorded.procs[victim] = Proc(victim, new.pid, new.argv, new.log)
    recorded.save()


@pytest.mark.parametrize("victim", ["agent", "processd", "targetd"])
def test_points_exact_after_kill9(victim: str, tmp_path: Path) -> None:
    tools = ("losetup", "e2fsck", "fsfreeze", "mkfs.ext4")
    if os.geteuid() != 0 or not all(shutil.which(t) for t in tools):
        pytest.skip("needs root, " + ", ".join(tools))
    state = tmp_path / "lab"
    writer: Writer | None = None
    mnt: Path | None = None
    try:
        lab_up(state)
        recorded = LabState.load(state.resolve())
        assert recorded is not None
        (disk,) = recorded.disks
        mnt = Path(disk.mount)
        started_ns = time.time_ns()
        writer = Writer(mnt)
        writer.start()
        # Mid-stream: the initial copy is done and deltas are flowing.
        wait_points_after(state, started_ns, 1, "before the kill")
        time.sleep(1.5)
        kill9_and_restart(state, victim)
        restarted_ns = time.time_ns()
        wait_points_after(state, restarted_ns, 1, f"after {victim} restarted")
        writer.stop()
        assert writer.written > 1 << 20, "the writer wrote too little to mean anything"
        remount_read_only(mnt)
        quiet_ns = time.time_ns()
        # Two, as asked: the first could in principle race the remount's own writes.
        newest = wait_points_after(state, quiet_ns, 2, "after the remount")[-1]
        source = device_sha256(disk.device)
        out = tmp_path / "out"
        lab(state, "materialize", newest["tag_id"], "--out", str(out))
        image = out / f"{disk.name}.img"
        assert file_sha256(image) == source, (
            f"after kill -9 of {victim}: point {newest['tag_id']} differs from the device"
        )
        fsck = subprocess.run(["e2fsck", "-fn", str(image)], check=False, capture_output=True,
                              text=True)  # fmt: skip
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        status = lab_json(state, "status")
        assert all(status["processes"].values()), status
    finally:
        if mnt is not None:
            thaw(mnt)  # a writer blocked on a frozen filesystem could never be joined
        if writer is not None:
            writer.halt.set()
            writer.join(timeout=30)
        lab(state, "down", check=False)
    leftover = subprocess.run(["losetup", "-a"], check=True, capture_output=True, text=True).stdout
    assert str(state) not in leftover, leftover
    assert str(state) not in Path("/proc/mounts").read_text()
