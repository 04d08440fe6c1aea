"""Quiescing the protected filesystems for a consistent recovery point, with a hard bound.

`freeze(mountpoints, timeout)` is a context manager: user pre-script (optional), then
FIFREEZE on every distinct filesystem, the body, then FITHAW and the post-script. Two
promises, because a writer blocked on a frozen filesystem cannot even be killed:

- Everything frozen is thawed: on a normal exit, on any exception including
  KeyboardInterrupt, when a later FIFREEZE fails, and when the body overruns.
- The freeze lasts at most `timeout` seconds from the first FIFREEZE (plus the thaw
  ioctls): the thread holding the freeze thaws at the deadline whatever the body is
  doing, and the context manager then raises FreezeTimeout on exit, so a caller that
  copied data inside it never tags that copy. The body can poll `Freeze.expired()` to
  give up earlier.

Freezing and thawing both happen on one worker thread (the body's exit just wakes it),
so a signal landing in the main thread can never fall between a FIFREEZE and its thaw.
Before freezing, each filesystem is synced (syncfs) outside the bound, so the FIFREEZE
inside it has little left to flush.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.errors import FreezeTimeout, QuiesceFailed

log = logging.getLogger(__name__)

FIFREEZE = 0xC0045877  # _IOWR('X', 119, int)
FITHAW = 0xC0045878  # _IOWR('X', 120, int)
SCRIPT_TIMEOUT = 60.0

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass
class Freeze:
    """The handle the body gets; `duration` and `overran` are final after the exit."""

    timeout: float
    started: float = 0.0  # monotonic time of the first FIFREEZE
    mountpoints: list[Path] = field(default_factory=list)
    duration: float | None = None
    overran: bool = False
    post_failure: str | None = None

    @property
    def deadline(self) -> float:
        return self.started + self.timeout

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def expired(self) -> bool:
        return time.monotonic() >= self.deadline


class _FreezeWorker(threading.Thread):
    """Freezes, waits, thaws: every FIFREEZE and FITHAW happens on this thread, which
    receives no signals, so a KeyboardInterrupt in the caller can never fall between a
    FIFREEZE and the bookkeeping that will thaw it. The thaw comes on `release()` or at
    the deadline, whichever is first; a deadline passed while still freezing thaws at
    once and never reports `ready` as a success."""

    def __init__(self, filesystems: list[Path], deadline: float) -> None:
        # Not a daemon: interpreter shutdown waits for it, so even an unhandled
        # exception in the caller cannot leave a filesystem frozen.
        super().__init__(name="fsfreeze", daemon=False)
        self.filesystems = filesystems
        self.deadline = deadline
        self.ready = threading.Event()  # all frozen, or gave up (see failure/by_deadline)
        self._release = threading.Event()
        self.frozen: list[Path] = []
        self.failure: QuiesceFailed | None = None
        self.by_deadline = False
        self.thawed_under_us: list[Path] = []

    def release(self) -> None:
        self._release.set()

    def run(self) -> None:
        held: list[tuple[Path, int]] = []
        try:
            for path in self.filesystems:
                if self._release.is_set() or time.monotonic() >= self.deadline:
                    break
                fd = self._freeze(path)
                if fd < 0:
                    return
                held.append((path, fd))
                self.frozen.append(path)
            if time.monotonic() >= self.deadline:
                self.by_deadline = True
                return
            self.ready.set()
            self._release.wait(max(0.0, self.deadline - time.monotonic()))
            self.by_deadline = not self._release.is_set()
        finally:
            for path, fd in reversed(held):
                self._thaw(path, fd)
            self.ready.set()

    def _freeze(self, path: Path) -> int:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as err:
            self.failure = QuiesceFailed(f"FIFREEZE {path}", err.strerror or str(err))
            return -1
        # A protected filesystem unmounted since discovery leaves its mountpoint as a
        # plain directory of the parent filesystem (the root, often): freezing that would
        # stall the whole host and vouch for a consistency nobody provided.
        try:
            parent_dev = os.stat(path.parent if path != path.parent else path).st_dev
            same_as_parent = path != path.parent and os.fstat(fd).st_dev == parent_dev
        except OSError as err:
            os.close(fd)
            self.failure = QuiesceFailed(f"FIFREEZE {path}", err.strerror or str(err))
            return -1
        if same_as_parent:
            os.close(fd)
            self.failure = QuiesceFailed(
                f"FIFREEZE {path}", "it is no longer a mountpoint (the filesystem was unmounted)"
            )
            return -1
        try:
            fcntl.ioctl(fd, FIFREEZE, 0)
        except OSError as err:
            # EBUSY: frozen by someone else already, whose freeze is not ours to thaw.
            os.close(fd)
            self.failure = QuiesceFailed(f"FIFREEZE {path}", err.strerror or str(err))
            return -1
        return fd

    def _thaw(self, path: Path, fd: int) -> None:
        try:
            fcntl.ioctl(fd, FITHAW, 0)
        except OSError as err:
            # Keep thawing the others whatever happens to this one. EINVAL is "not
            # frozen": someone else thawed it during our freeze.
            if err.errno == errno.EINVAL:
                self.thawed_under_us.append(path)
            log.error("FITHAW %s: %s", path, err)
        finally:
            os.close(fd)


def run_script(argv: Sequence[str], timeout: float, what: str) -> None:
    """Run a user pre/post script in its own session; QuiesceFailed on a non-zero exit
    or after `timeout` (then the whole process group is killed, not just the shell)."""
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as err:
        raise QuiesceFailed(f"{what} script", f"{argv[0]}: {err.strerror}") from err
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as err:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise QuiesceFailed(f"{what} script", f"{argv[0]} ran over {timeout:.0f} s") from err
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    if proc.returncode != 0:
        tail = output.decode(errors="replace").strip().splitlines()[-1:] or [""]
        raise QuiesceFailed(f"{what} script", f"{argv[0]} exited with {proc.returncode}: {tail[0]}")


def distinct_filesystems(mountpoints: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """One mountpoint per filesystem: a bind mount of a frozen fs would answer EBUSY."""
    seen: set[int] = set()
    unique: list[Path] = []
    for mountpoint in mountpoints:
        path = Path(mountpoint)
        dev = os.stat(path).st_dev
        if dev not in seen:
            seen.add(dev)
            unique.append(path)
    return unique


def syncfs(path: Path) -> None:
    """Flush one filesystem before freezing it, so FIFREEZE (which cannot be
    interrupted and counts against the bound) has little left to write."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


@contextlib.contextmanager
def freeze(
    mountpoints: Iterable[str | os.PathLike[str]],
    timeout: float = 1.0,
    *,
    pre: Sequence[str] | None = None,
    post: Sequence[str] | None = None,
    script_timeout: float = SCRIPT_TIMEOUT,
) -> Iterator[Freeze]:
    """Quiesce: pre-script, FIFREEZE each filesystem, yield, thaw, post-script.

    QuiesceFailed (nothing frozen any more) if the pre-script fails or a filesystem
    cannot be frozen; FreezeTimeout if freezing or the body outlived `timeout` (the
    bound runs from the first FIFREEZE). The post-script runs in every case, after the
    thaw; its failure is logged and kept in `post_failure`. With no mountpoints only
    the scripts run (the application-level alternative to FIFREEZE).
    """
    handle = Freeze(timeout)
    try:
        if pre:
            run_script(pre, script_timeout, "pre")
        try:
            filesystems = distinct_filesystems(mountpoints)
            for path in filesystems:
                syncfs(path)
        except OSError as err:
            raise QuiesceFailed("sync", str(err)) from err
        with _frozen(filesystems, handle):
            yield handle
    finally:
        if post:
            try:
                run_script(post, script_timeout, "post")
            except QuiesceFailed as err:
                log.error("%s", err)
                handle.post_failure = err.message


@contextlib.contextmanager
def _frozen(filesystems: list[Path], handle: Freeze) -> Iterator[None]:
    handle.started = time.monotonic()
    worker = _FreezeWorker(filesystems, handle.deadline)
    worker.start()
    try:
        worker.ready.wait()
        if worker.failure is not None:
            raise worker.failure
        if worker.by_deadline:
            raise FreezeTimeout(handle.timeout, time.monotonic() - handle.started)
        handle.mountpoints = list(worker.frozen)
        yield
    finally:
        worker.release()
        worker.join()
        handle.mountpoints = list(worker.frozen)
        handle.duration = time.monotonic() - handle.started
        handle.overran = worker.by_deadline
        log.debug("froze %s for %.3f s", [str(p) for p in handle.mountpoints], handle.duration)
    if worker.thawed_under_us:
        lost = ", ".join(str(p) for p in worker.thawed_under_us)
        raise QuiesceFailed("thaw", f"thawed by another process while frozen: {lost}")
    if handle.overran:
        raise FreezeTimeout(handle.timeout, handle.duration)
