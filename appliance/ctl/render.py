"""Human units and terminal-width tables for secondsitectl.

Every formatter takes whatever a record holds (records leave unknown values out, and
the core may still be missing keys) and prints "-" for anything absent or malformed,
so one odd record never costs the operator the whole listing.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Record = Mapping[str, Any]

MISSING = "-"
ELLIPSIS = "…"
GAP = "  "  # between columns, as systemctl does

_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
_RECENT_S = 3600.0  # newer than this reads better as "12m ago" than as a clock time


def _number(value: object) -> float | None:
    # bool is an int; a True where a number belongs is not a number.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if math.isnan(value) or math.isinf(value):
        return None
    return float(value)


def fmt_bytes(value: object) -> str:
    """1536 -> "1.5 KiB"; three significant digits at most, binary units."""
    n = _number(value)
    if n is None or n < 0:
        return MISSING
    unit = 0
    while n >= 1024 and unit < len(_BYTE_UNITS) - 1:
        n /= 1024
        unit += 1
    if unit == 0:
        return f"{int(n)} B"
    return f"{n:.1f} {_BYTE_UNITS[unit]}" if n < 100 else f"{n:.0f} {_BYTE_UNITS[unit]}"


def fmt_rate(value: object) -> str:
    text = fmt_bytes(value)
    return text if text == MISSING else f"{text}/s"


def fmt_duration(value: object) -> str:
    """Seconds as 4s, 3m12s, 2h05m, 3d04h: two units at most, like `systemctl status`."""
    n = _number(value)
    if n is None or n < 0:  # the server reports -1 for "no recovery point yet"
        return MISSING
    if 0 < n < 1:
        return "<1s"
    s = round(n)
    days, rest = divmod(s, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{seconds:02d}s"
    return f"{seconds}s"


def fmt_time(value: object, now: float | None = None, *, seconds: bool = False) -> str:
    """Unix seconds as "5s ago" within the last hour, else local ISO to the minute.

    `seconds` always gives the absolute time to the second (recovery points are taken
    every few seconds, so minutes would make neighbours look identical)."""
    t = _number(value)
    if t is None or t <= 0:
        return MISSING
    now = time.time() if now is None else now
    if not seconds:
        age = now - t
        if -5 <= age < _RECENT_S:  # a few seconds ahead is clock skew, not the future
            return f"{fmt_duration(max(age, 0.0))} ago"
    pattern = "%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M"
    return time.strftime(pattern, time.localtime(t))


def fmt_percent(value: object) -> str:
    n = _number(value)
    if n is None or n < 0:
        return MISSING
    # Floor, so a copy that is not finished never shows 100%.
    return f"{min(math.floor(n), 100)}%" if n < 100 else "100%"


def fmt_bool(value: object, yes: str = "yes", no: str = "no") -> str:
    if not isinstance(value, bool):
        return MISSING
    return yes if value else no


def fmt_text(value: object) -> str:
    if value is None or value == "":
        return MISSING
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or MISSING
    # One record must stay on one row whatever the server put in a message.
    return " ".join(str(value).split()) or MISSING


def fmt_count(value: object) -> str:
    if isinstance(value, list):  # some records list names where a count would do
        return str(len(value))
    n = _number(value)
    return MISSING if n is None else str(int(n))


def truncate(text: str, width: int) -> str:
    if len(text) <= width:
        return text
    if width <= 1:
        return ELLIPSIS[:width]
    return text[: width - 1] + ELLIPSIS


def progress_bar(percent: object, width: int) -> str:
    """A bar of `width` cells, brackets included: [#####.....]."""
    inner = max(width - 2, 1)
    n = _number(percent)
    filled = 0 if n is None else min(max(int(n / 100 * inner), 0), inner)
    return "[" + "#" * filled + "." * (inner - filled) + "]"


@dataclass(frozen=True)
class Column:
    """One table column.

    `shrink` columns are truncated with an ellipsis (down to `min_width`, never into
    the header) before anything is dropped; then `drop` ranks what goes when the
    terminal is still too narrow: the highest first, 0 never."""

    header: str
    cell: Callable[[Record], str]
    drop: int = 0
    shrink: bool = False
    min_width: int = 8
    right: bool = False


def field(key: str, fmt: Callable[[object], str] = fmt_text) -> Callable[[Record], str]:
    """A cell that formats one key of the record."""
    return lambda record: fmt(record.get(key))


def _floor(column: Column, natural: int) -> int:
    # A cut header reads worse than a missing column, so never shrink below it.
    return min(natural, max(column.min_width, len(column.header)))


def _fit(
    columns: Sequence[Column], natural: list[int], width: int | None
) -> tuple[list[int], list[int]]:
    """Choose which columns to show (their indices) and how wide each is."""
    shown = list(range(len(columns)))
    while True:
        widths = [natural[i] for i in shown]
        if width is None:
            return shown, widths
        excess = sum(widths) + len(GAP) * (len(shown) - 1) - width
        # Take the excess from the widest shrinkable column, one cell at a time, so
        # the cut is shared out instead of gutting one column.
        while excess > 0:
            candidates = [
                k
                for k, i in enumerate(shown)
                if columns[i].shrink and widths[k] > _floor(columns[i], natural[i])
            ]
            if not candidates:
                break
            k = max(candidates, key=lambda k: widths[k])
            widths[k] -= 1
            excess -= 1
        droppable = [i for i in shown if columns[i].drop > 0]
        if excess <= 0 or not droppable:
            return shown, widths
        shown.remove(max(droppable, key=lambda i: (columns[i].drop, i)))


def table(columns: Sequence[Column], records: Iterable[Record], width: int | None) -> list[str]:
    """The lines of a table (header first) fitting `width` cells; None: no limit."""
    rows = [[col.cell(record) for col in columns] for record in records]
    natural = [
        max([len(col.header), *(len(row[i]) for row in rows)]) for i, col in enumerate(columns)
    ]
    shown, widths = _fit(columns, natural, width)
    lines = []
    for cells in [[col.header for col in columns], *rows]:
        parts = []
        for i, w in zip(shown, widths, strict=True):
            text = truncate(cells[i], w)
            parts.append(text.rjust(w) if columns[i].right else text.ljust(w))
        line = GAP.join(parts).rstrip()
        # A last resort for absurdly narrow terminals: never wrap.
        lines.append(line if width is None else truncate(line, width))
    return lines


def key_values(pairs: Sequence[tuple[str, str]], width: int | None) -> list[str]:
    """An aligned `Label: value` block, as in `systemctl status`."""
    label_width = max((len(label) for label, _ in pairs), default=0) + 1
    lines = []
    for label, value in pairs:
        line = f"{label + ':':>{label_width}} {value}"
        lines.append(line if width is None else truncate(line, width))
    return lines


def _initial(record: Record) -> str:
    if record.get("initial_done") is True:
        return "done"
    return fmt_percent(record.get("initial_percent"))


def _hours(value: object) -> str:
    return fmt_duration(value * 3600 if isinstance(value, int | float) else None)


def _when(key: str, now: float | None, *, seconds: bool = False) -> Callable[[Record], str]:
    return lambda record: fmt_time(record.get(key), now, seconds=seconds)


# The listings' columns. `drop` ranks what a narrow terminal loses first: the
# columns that answer "is it safe?" (name, state, RPO) stay.


def machine_columns() -> list[Column]:
    return [
        Column("NAME", field("name"), shrink=True, min_width=10),
        Column("STATE", field("state")),
        Column("RPO", field("rpo_seconds", fmt_duration), right=True),
        Column("THRESHOLD", field("rpo_threshold_s", fmt_duration), drop=2, right=True),
        Column("POLICY", field("policy"), drop=3, shrink=True),
        Column("PROCESS SERVER", field("process_server"), drop=4, shrink=True),
        Column("MASTER TARGET", field("master_target"), drop=5, shrink=True),
        Column("SYNC", field("initial_percent", fmt_percent), drop=1, right=True),
    ]


def disk_columns() -> list[Column]:
    return [
        Column("DISK", field("disk_id"), shrink=True),
        Column("PATH", field("path"), drop=4, shrink=True),
        Column("SIZE", field("size_bytes", fmt_bytes), right=True),
        Column("SYNC", _initial, right=True),
        Column("BACKLOG", field("backlog_bytes", fmt_bytes), right=True),
        Column("IN", field("rate_in", fmt_rate), drop=3, right=True),
        Column("OUT", field("rate_out", fmt_rate), drop=3, right=True),
        Column("RESYNC", field("resync_required", fmt_bool), drop=1),
    ]


def point_columns() -> list[Column]:
    return [
        Column("TIME", _when("time", None, seconds=True)),
        Column("TAG", field("tag"), shrink=True, min_width=12),
        Column("KIND", field("kind")),
        Column("USABLE", field("usable", fmt_bool)),
    ]


def server_columns(now: float | None) -> list[Column]:
    return [
        Column("NAME", field("name"), shrink=True, min_width=10),
        Column("ROLE", field("role")),
        Column("ADDRESS", field("address"), drop=6, shrink=True),
        Column("CONNECTED", field("connected", fmt_bool)),
        Column("LAST SEEN", _when("last_seen", now), drop=1),
        Column("MACHINES", field("machines", fmt_count), drop=3, right=True),
        Column("BACKLOG", field("backlog_bytes", fmt_bytes), drop=4, right=True),
        Column("FREE", field("free_bytes", fmt_bytes), drop=2, right=True),
        Column("CAPACITY", field("capacity_bytes", fmt_bytes), drop=5, right=True),
    ]


def job_columns(now: float | None) -> list[Column]:
    return [
        Column("ID", field("id"), shrink=True),
        Column("KIND", field("kind")),
        Column("SUBJECT", field("subject"), shrink=True),
        Column("STATE", field("state")),
        Column("PROGRESS", field("percent", fmt_percent), drop=1, right=True),
        Column("STEP", field("step"), drop=2, shrink=True, min_width=10),
        Column("UPDATED", _when("updated_at", now), drop=3),
    ]


def alert_columns(now: float | None, cleared: bool) -> list[Column]:
    columns = [
        Column("SEVERITY", field("severity")),
        Column("SUBJECT", field("subject"), shrink=True),
        Column("KIND", field("kind"), drop=4),
        Column("RAISED", _when("raised_at", now), drop=2),
        Column("MESSAGE", field("message"), shrink=True, min_width=16),
        Column("ID", field("id"), drop=5),
    ]
    if cleared:
        columns.insert(4, Column("CLEARED", _when("cleared_at", now), drop=3))
    return columns


def event_columns() -> list[Column]:
    return [
        Column("TIME", _when("time", None, seconds=True), drop=1),
        Column("SEVERITY", field("severity"), drop=2),
        Column("SUBJECT", field("subject"), shrink=True),
        Column("KIND", field("kind"), drop=3),
        Column("MESSAGE", field("message"), shrink=True, min_width=16),
    ]


def policy_columns() -> list[Column]:
    return [
        Column("NAME", field("name"), shrink=True),
        Column("RPO THRESHOLD", field("rpo_threshold_s", fmt_duration), right=True),
        Column("CRASH", field("crash_interval_s", fmt_duration), right=True),
        Column("APP", field("app_interval_s", fmt_duration), right=True),
        Column("KEEP", field("retention_hours", _hours), right=True),
        Column("KEEP BYTES", field("retention_bytes", fmt_bytes), drop=1, right=True),
        Column("PRE SCRIPT", field("pre_script"), drop=3, shrink=True),
        Column("POST SCRIPT", field("post_script"), drop=2, shrink=True),
    ]


def to_json(data: object) -> str:
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False)
