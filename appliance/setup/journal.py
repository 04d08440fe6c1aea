"""A unit's recent journal lines, read with `journalctl -u UNIT -n N -o json`.

journalctl (not a journal library) because it is in every image that has systemd and
needs no binding. An appliance without a journal (no journald, no journal files)
is not an error: the result says so in `note`, with no lines. `command` is the
journalctl invocation; a test prefixes it with nsenter to read a journal that lives
in a private mount namespace.
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from appliance.setup.errors import InvalidArgument

_log = logging.getLogger(__name__)

MAX_LINES = 500
MAX_MESSAGE = 2000  # characters kept of one message: a console line, not a core dump
TIMEOUT = 15.0
NO_JOURNAL = "no journal on this appliance (is systemd-journald running?)"


@dataclass(frozen=True)
class JournalLines:
    unit: str
    available: bool
    note: str = ""
    lines: list[dict[str, Any]] = field(default_factory=list)

    def as_record(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "available": self.available,
            "note": self.note,
            "lines": self.lines,
        }


def check_count(count: int) -> int:
    if not 1 <= count <= MAX_LINES:
        raise InvalidArgument(f"lines must be between 1 and {MAX_LINES}, not {count}")
    return count


def _message(value: Any) -> str:
    # journalctl -o json gives a non-UTF-8 message as a list of byte values.
    if isinstance(value, list):
        value = bytes(v for v in value if isinstance(v, int) and 0 <= v < 256).decode(
            "utf-8", "replace"
        )
    text = str(value if value is not None else "")
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE] + "..."


def _line(entry: dict[str, Any]) -> dict[str, Any]:
    """One entry as {time (ISO 8601 UTC), priority (0-7), identifier, message}."""
    out: dict[str, Any] = {"message": _message(entry.get("MESSAGE"))}
    try:
        micros = int(entry["__REALTIME_TIMESTAMP"])
        out["time"] = datetime.fromtimestamp(micros / 1e6, UTC).isoformat(timespec="seconds")
    except (KeyError, ValueError, TypeError, OverflowError):
        pass
    with contextlib.suppress(KeyError, ValueError, TypeError):
        out["priority"] = int(entry["PRIORITY"])
    identifier = entry.get("SYSLOG_IDENTIFIER") or entry.get("_COMM")
    if isinstance(identifier, str):
        out["identifier"] = identifier
    return out


class Journal:
    def __init__(self, command: Sequence[str] = ("journalctl",)) -> None:
        self.command = list(command)

    def _run(self, args: list[str]) -> tuple[int, str, str]:
        done = subprocess.run(
            [*self.command, "--no-pager", "-q", *args],
            capture_output=True, text=True, errors="replace", timeout=TIMEOUT, check=False,
        )  # fmt: skip
        return done.returncode, done.stdout, done.stderr

    def lines(self, unit: str, count: int) -> JournalLines:
        """The last `count` entries of `unit`, oldest first."""
        check_count(count)
        try:
            code, out, err = self._run(["-u", unit, "-n", str(count), "-o", "json"])
        except FileNotFoundError:
            return JournalLines(unit, False, "journalctl is not installed: no journal to read")
        except subprocess.TimeoutExpired:
            return JournalLines(unit, False, f"journalctl did not answer within {TIMEOUT:.0f} s")
        if code != 0:
            reason = err.strip().splitlines()[-1] if err.strip() else f"exit status {code}"
            return JournalLines(unit, False, f"journalctl failed: {reason}")
        lines = []
        for text in out.splitlines():
            try:
                entry = json.loads(text)
            except json.JSONDecodeError:
                _log.warning("journalctl gave a line that is not JSON: %.80r", text)
                continue
            if isinstance(entry, dict):
                lines.append(_line(entry))
        if lines:
            return JournalLines(unit, True, "", lines)
        # Nothing for the unit: tell "no journal at all" from "the unit said nothing".
        code, out, _ = self._run(["-n", "1", "-o", "json"])
        if code != 0 or not out.strip():
            return JournalLines(unit, False, NO_JOURNAL)
        return JournalLines(unit, True, f"no journal entries for {unit}")
