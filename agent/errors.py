"""Errors of the source-host agent: one root, flat leaves (STYLE 3).

Callers catch a leaf when they have a specific recovery (re-discover a disk that
resized, fall back to the scan tracker) and `AgentError` at the top, where it becomes
one operator line with a hint. Anything that is not an `AgentError` is a bug.
"""

from __future__ import annotations

from pathlib import Path


class AgentError(Exception):
    """Root of every agent error; `hint` is the one line an operator can act on."""

    hint: str = ""

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        if hint:
            self.hint = hint


class DeviceGone(AgentError):
    """A protected disk disappeared, or its major:minor now names a different medium."""

    hint = "the disk was detached or replaced; protect it again once it is back"

    def __init__(self, device: str, reason: str) -> None:
        super().__init__(f"{device}: {reason}")
        self.device = device
        self.reason = reason


class DeviceResized(AgentError):
    """A protected disk's size changed (shrank or grew): its replica no longer matches."""

    hint = "a resized disk needs its replica resized; re-enable protection for it"

    def __init__(self, device: str, old_size: int, new_size: int) -> None:
        verb = "grew" if new_size > old_size else "shrank"
        super().__init__(f"{device}: {verb} from {old_size} to {new_size} bytes")
        self.device = device
        self.old_size = old_size
        self.new_size = new_size


class TrackerUnavailable(AgentError):
    """A tracker cannot run on this host; `fallback` names the tracker to use instead."""

    def __init__(self, tracker: str, reason: str, *, fallback: str | None = None) -> None:
        hint = f"falling back to the {fallback} tracker" if fallback else ""
        super().__init__(f"{tracker} tracker unavailable: {reason}", hint=hint)
        self.tracker = tracker
        self.reason = reason
        self.fallback = fallback


class StateCorrupt(AgentError):
    """A persisted state file fails its checks (magic, version, CRC, length)."""

    hint = "the file is ignored and the disk is resynchronised by checksum"

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class BarrierTimeout(AgentError):
    """A tracker could not prove it had read every event up to now (its trace marker
    did not come back in time); nothing was drained, a later drain loses nothing."""

    hint = "the tracer is falling behind; the recovery point is skipped this time"

    def __init__(self, device: str, timeout: float) -> None:
        super().__init__(f"{device}: drain barrier not back within {timeout:.3f} s")
        self.device = device
        self.timeout = timeout


class QuiesceFailed(AgentError):
    """The machine could not be quiesced (a pre-script failed, FIFREEZE was refused, or
    a filesystem was thawed by someone else while frozen): no consistent point."""

    hint = "the recovery point is skipped; check the pre-script and the filesystems"

    def __init__(self, what: str, reason: str) -> None:
        super().__init__(f"quiesce {what}: {reason}")
        self.what = what
        self.reason = reason


class FreezeTimeout(AgentError):
    """The frozen section overran its hard bound and the watchdog thawed the
    filesystems: whatever was copied inside it is not from one instant."""

    hint = "the dirty set is too large to copy inside the freeze bound; data goes untagged"

    def __init__(self, bound: float, elapsed: float) -> None:
        super().__init__(f"freeze overran its bound of {bound:.3f} s ({elapsed:.3f} s)")
        self.bound = bound
        self.elapsed = elapsed
