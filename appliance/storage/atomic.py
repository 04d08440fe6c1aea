"""Atomic metadata writes: temp file in the same directory, fsync, rename, fsync dir.

This is the only way metadata reaches the disk (DESIGN "Storage"). After a crash the
target path holds either the complete old contents or the complete new contents, never
a mixture, and a completed call survives power loss because the directory entry itself
was made durable.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path | str) -> None:
    """Make the directory entries of ``path`` (a directory) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: Path | str, data: bytes, mode: int = 0o644, *, exclusive: bool = False
) -> None:
    """Replace ``path`` with ``data`` atomically and durably.

    With ``exclusive=True`` an existing ``path`` is never replaced: the final step is a
    hard link instead of a rename, which fails with :class:`FileExistsError` if the name
    is taken (the temp file is removed either way).
    """
    target = Path(path)
    directory = target.parent
    # The temp name carries the pid so two processes never share one; O_EXCL makes a
    # stale leftover from a crashed writer an error instead of a silent overwrite.
    tmp = directory / f".{target.name}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fchmod(fd, mode)  # the umask must not weaken or widen the asked mode
            os.fsync(fd)
        finally:
            os.close(fd)
        if exclusive:
            os.link(tmp, target)
            os.unlink(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(directory)
