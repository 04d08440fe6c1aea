"""A private tracefs instance for one disk: creation, configuration, counters, removal.

The tracker (`agent.trackers.tracefs`) owns the reading and the dirty map; this module
owns everything that touches tracefs files. An instance is a directory
`<tracefs>/instances/secondsite-<pid>-<starttime>-<major>_<minor>-<n>`: its own ring
buffers, event enables, filters and trace_marker, so the agent never disturbs the
host's global tracing (or another agent's instance), and a crashed agent's leftovers
can be recognised by name and removed (the pid alone is not enough: pids are reused,
so the process start time is part of the name).

Findings on the 6.18 kernel of the build machines (loop device, ext4 on top):
- `block_bio_queue` fires per submitted bio and `block_rq_complete` per completed
  request (also for partial completions); both carry the whole disk's dev_t and
  whole-disk sectors, even for a filesystem on a partition (the partition remap happens
  before the queue tracepoint).
- `block_bio_complete` never fired for the loop device: it needs BIO_TRACE_COMPLETION,
  which plain blk-mq submission does not set. Completions come from `block_rq_complete`,
  which exists only for request-based (blk-mq) disks; bio-based ones (dm, md) are
  refused with TrackerUnavailable rather than tracked without completion events.
- Flushes complete as `FF` with sector 2**64-1 and 0 sectors, and a request with
  PREFLUSH/FUA completes a second time with 0 sectors; both are filtered out in the
  kernel (`nr_sector > 0`). Write-zeroes shows as `N`, discard as `D`: both change what
  the disk reads back, so only reads (`R`) are filtered out.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from agent.errors import TrackerUnavailable

log = logging.getLogger(__name__)

DEFAULT_TRACEFS = Path("/sys/kernel/tracing")
PREFIX = "secondsite-"
EVENTS = ("block_bio_queue", "block_rq_complete")

_NAME = re.compile(rf"^{PREFIX}(\d+)-(\d+)-\d+_\d+-\d+$")
_COUNTERS = ("overrun", "commit overrun", "dropped events")
_SEQUENCE = itertools.count(1)  # unique instance names within this process


def _unavailable(reason: str) -> TrackerUnavailable:
    return TrackerUnavailable("tracefs", reason, fallback="scan")


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks since boot), None if the pid is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) may contain spaces and parentheses: count from the last ')'.
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def ensure_mounted(root: Path) -> None:
    """Mount tracefs at the default root when it is not mounted yet (as the FIELD-NOTES
    machine had it); any other root must already be a tracefs."""
    try:
        if (root / "instances").is_dir():
            return
    except PermissionError as err:
        raise _unavailable(
            f"{root}: {err.strerror}; tracefs is root-only (agent uid {os.geteuid()})"
        ) from err
    if os.geteuid() != 0:
        raise _unavailable(f"tracefs is root-only and the agent runs as uid {os.geteuid()}")
    if root != DEFAULT_TRACEFS or not root.is_dir():
        raise _unavailable(f"{root} is not a mounted tracefs")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"nodev", str(root).encode(), b"tracefs", 0, None) != 0:
        reason = os.strerror(ctypes.get_errno())
        raise _unavailable(f"cannot mount tracefs on {root}: {reason}")
    if not (root / "instances").is_dir():
        raise _unavailable(f"{root}: tracefs without instances (kernel too old)")


def remove_stale(root: Path) -> list[str]:
    """Remove instances left by agents that no longer run; returns their names.

    An instance is stale when its pid is gone or now belongs to a process that started
    at another time. Live agents' instances (including this process's) are left alone.
    """
    removed: list[str] = []
    instances = root / "instances"
    for entry in sorted(instances.iterdir()):
        match = _NAME.match(entry.name)
        if match is None:
            continue
        pid, started = int(match[1]), int(match[2])
        if process_start_time(pid) == started:
            continue
        try:
            _quiet(entry)
            entry.rmdir()
        except OSError as err:
            # Still busy (a reader of the dead agent's pipe lingering in another
            # process?): leave it for the next start, it costs only its buffers.
            log.warning("cannot remove stale tracefs instance %s: %s", entry.name, err)
            continue
        log.info("removed stale tracefs instance %s (agent pid %d is gone)", entry.name, pid)
        removed.append(entry.name)
    return removed


def _quiet(path: Path) -> None:
    """Turn an instance's events off before rmdir (best effort on a stale one: the
    kernel removes them with the directory anyway)."""
    for event in EVENTS:
        enable = path / "events" / "block" / event / "enable"
        if enable.exists():
            enable.write_text("0")


@dataclass(frozen=True)
class Counters:
    """Sum of the per-CPU loss counters of an instance's ring buffers."""

    overrun: int
    commit_overrun: int
    dropped: int

    @property
    def lost(self) -> int:
        return self.overrun + self.commit_overrun + self.dropped


class Instance:
    """One private tracefs instance tracing writes to one whole disk (major:minor)."""

    def __init__(self, root: Path, major: int, minor: int, buffer_size_kb: int) -> None:
        started = process_start_time(os.getpid())
        self.name = f"{PREFIX}{os.getpid()}-{started}-{major}_{minor}-{next(_SEQUENCE)}"
        self.root = root
        self.path = root / "instances" / self.name
        self.major = major
        self.minor = minor
        self.buffer_size_kb = buffer_size_kb

    def create(self) -> None:
        """mkdir the instance and configure it; events are enabled last, by `enable`."""
        for event in EVENTS:
            if not (self.root / "events" / "block" / event).is_dir():
                raise _unavailable(f"kernel has no block tracepoint {event}")
        try:
            self.path.mkdir()
        except PermissionError as err:
            raise _unavailable(
                f"cannot create {self.path}: {err.strerror} (not root, or kernel lockdown)"
            ) from err
        except OSError as err:
            raise _unavailable(f"cannot create {self.path}: {err.strerror}") from err
        try:
            self._write("buffer_size_kb", str(self.buffer_size_kb))
            # poll() on trace_pipe waits for buffer_percent of the buffer to fill (50 by
            # default): the reader must wake on every event, or it lags and overruns.
            self._write("buffer_percent", "0")
            # Without the task/cpu/timestamp prefix a line starts with the event name,
            # and a comm with spaces or colons cannot confuse the parser.
            self._write("options/context-info", "0")
            self._set_filters()
        except BaseException:
            self.remove()
            raise

    def _set_filters(self) -> None:
        dev = self.major << 20 | self.minor
        full = f'dev == {dev} && nr_sector > 0 && !(rwbs ~ "*R*")'
        for event in EVENTS:
            try:
                self._write(f"events/block/{event}/filter", full)
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise
                # A kernel without glob matching on strings: filter by device only, the
                # parser drops reads and empty completions itself.
                log.info("tracefs filter without rwbs glob on this kernel: %s", err)
                self._write(f"events/block/{event}/filter", f"dev == {dev}")

    def set_clock(self, clock: str) -> None:
        self._write("trace_clock", clock)

    def enable(self) -> None:
        for event in EVENTS:
            self._write(f"events/block/{event}/enable", "1")
        self._write("tracing_on", "1")

    def disable(self) -> None:
        for event in EVENTS:
            self._write(f"events/block/{event}/enable", "0")

    def remove(self) -> None:
        """rmdir the instance; idempotent. The caller closes its pipe first (an open
        trace_pipe makes rmdir fail with EBUSY)."""
        if not self.path.exists():
            return
        try:
            self.disable()
        except FileNotFoundError:
            return
        self.path.rmdir()

    def counters(self) -> Counters:
        totals = dict.fromkeys(_COUNTERS, 0)
        for stats in sorted(self.path.glob("per_cpu/cpu*/stats")):
            for line in stats.read_text().splitlines():
                key, _, value = line.partition(":")
                if key in totals:
                    totals[key] += int(value)
        return Counters(totals["overrun"], totals["commit overrun"], totals["dropped events"])

    def open_pipe(self) -> int:
        return os.open(self.path / "trace_pipe", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)

    def open_marker(self) -> int:
        return os.open(self.path / "trace_marker", os.O_WRONLY | os.O_CLOEXEC)

    def _write(self, relative: str, value: str) -> None:
        with open(self.path / relative, "w") as f:
            f.write(value)


def online_cpus() -> set[int]:
    """CPUs the kernel has online (`0-3,6`), which can hold trace events."""
    text = Path("/sys/devices/system/cpu/online").read_text().strip()
    cpus: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus
