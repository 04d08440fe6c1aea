"""Units and tables: what an operator reads at 80 columns and at 200."""

from __future__ import annotations

import time

import pytest

from appliance.ctl import render
from appliance.ctl.render import (
    Column,
    field,
    fmt_bytes,
    fmt_duration,
    fmt_percent,
    fmt_time,
    table,
)

NOW = 1_750_000_000.0


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1536, "1.5 KiB"),
        (200 * 2**20, "200 MiB"),
        (50 * 2**30, "50.0 GiB"),
        (3 * 2**40, "3.0 TiB"),
        (None, "-"),
        (-1, "-"),
        (True, "-"),  # a bool is not a size
        ("12", "-"),
        (float("nan"), "-"),
    ],
)
def test_bytes(value: object, text: str) -> None:
    assert fmt_bytes(value) == text


def test_rate() -> None:
    assert render.fmt_rate(1536) == "1.5 KiB/s"
    assert render.fmt_rate(None) == "-"


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0s"),
        (0.3, "<1s"),
        (4, "4s"),
        (4.4, "4s"),
        (59.6, "1m00s"),
        (192, "3m12s"),
        (7500, "2h05m"),
        (90061, "1d01h"),
        (-1, "-"),  # the server's "no recovery point yet"
        (None, "-"),
    ],
)
def test_duration(value: object, text: str) -> None:
    assert fmt_duration(value) == text


def test_time_recent_reads_as_ago() -> None:
    assert fmt_time(NOW - 5, NOW) == "5s ago"
    assert fmt_time(NOW - 192, NOW) == "3m12s ago"
    assert fmt_time(NOW + 2, NOW) == "0s ago"  # clock skew, not the future


def test_time_older_is_local_iso_minutes() -> None:
    old = NOW - 3 * 86400
    assert fmt_time(old, NOW) == time.strftime("%Y-%m-%d %H:%M", time.localtime(old))
    exact = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(NOW - 5))
    assert fmt_time(NOW - 5, NOW, seconds=True) == exact
    assert fmt_time(None, NOW) == "-"
    assert fmt_time(0, NOW) == "-"


@pytest.mark.parametrize(
    ("value", "text"), [(0, "0%"), (42.9, "42%"), (99.99, "99%"), (100, "100%"), (None, "-")]
)
def test_percent_never_rounds_up_to_done(value: object, text: str) -> None:
    assert fmt_percent(value) == text


def test_text_and_counts() -> None:
    assert render.fmt_text("two\nlines\tand  tabs") == "two lines and tabs"
    assert render.fmt_text("") == "-"
    assert render.fmt_text(["a", "b"]) == "a, b"
    assert render.fmt_count(["web01", "web02"]) == "2"
    assert render.fmt_count(3) == "3"
    assert render.fmt_bool(True) == "yes"
    assert render.fmt_bool(None) == "-"


def test_truncate_and_bar() -> None:
    assert render.truncate("abcdef", 6) == "abcdef"
    assert render.truncate("abcdef", 4) == "abc…"
    assert render.progress_bar(50, 12) == "[#####.....]"
    assert render.progress_bar(None, 6) == "[....]"
    assert render.progress_bar(250, 6) == "[####]"


def _machines(n: int) -> list[dict[str, object]]:
    return [
        {
            "name": f"database-server-with-a-long-name-{i:02d}",
            "state": "protected",
            "rpo_seconds": 12 + i,
            "rpo_threshold_s": 900,
            "policy": "gold",
            "process_server": "process-01.datacenter.example",
            "master_target": "target-01.recovery-site.example",
            "initial_percent": 100,
        }
        for i in range(n)
    ]


def test_wide_terminal_shows_everything() -> None:
    lines = table(render.machine_columns(), _machines(3), 200)
    assert len(lines) == 4
    assert lines[0] == (
        "NAME                                 STATE      RPO  THRESHOLD  POLICY  PROCESS SERVER"
        "                 MASTER TARGET                    SYNC"
    )
    assert "…" not in "".join(lines)
    assert "database-server-with-a-long-name-02" in lines[3]
    assert "target-01.recovery-site.example" in lines[3]
    assert all(len(line) <= 200 for line in lines)


def test_narrow_terminal_truncates_then_drops_least_useful_columns() -> None:
    lines = table(render.machine_columns(), _machines(3), 80)
    assert all(len(line) <= 80 for line in lines)
    header = lines[0]
    # What answers "is it safe?" stays; the master target goes first.
    for kept in ("NAME", "STATE", "RPO"):
        assert kept in header
    # The master target goes first; headers are never cut, the long values are.
    assert header.split() == [
        "NAME", "STATE", "RPO", "THRESHOLD", "POLICY", "PROCESS", "SERVER", "SYNC"
    ]  # fmt: skip
    assert "process-01.datacen…" in lines[1]
    assert "13s" in lines[2]
    assert table(render.machine_columns(), _machines(3), 60)[0].split() == [
        "NAME", "STATE", "RPO", "THRESHOLD", "POLICY", "SYNC"
    ]  # fmt: skip


def test_very_narrow_terminal_keeps_the_essentials() -> None:
    lines = table(render.machine_columns(), _machines(2), 40)
    assert all(len(line) <= 40 for line in lines)
    assert lines[0].split()[:3] == ["NAME", "STATE", "RPO"]
    assert "…" in lines[1]  # the name was cut, with a visible mark


def test_no_width_never_truncates() -> None:
    lines = table(render.machine_columns(), _machines(1), None)
    assert "…" not in lines[1]
    assert "target-01.recovery-site.example" in lines[1]


def test_shrink_shares_the_cut_and_right_aligns_numbers() -> None:
    columns = [
        Column("A", field("a"), shrink=True, min_width=4),
        Column("B", field("b"), shrink=True, min_width=4),
        Column("N", field("n", fmt_bytes), right=True),
    ]
    records = [{"a": "x" * 20, "b": "y" * 20, "n": 1536}, {"a": "z", "b": "w", "n": 1}]
    lines = table(columns, records, 30)
    assert all(len(line) <= 30 for line in lines)
    a, b, size, unit = lines[1].split()
    assert abs(len(a) - len(b)) <= 1  # neither column was gutted alone
    assert a.endswith("…")
    assert (size, unit) == ("1.5", "KiB")
    assert lines[2].endswith("    1 B")


def test_empty_table_is_just_the_header() -> None:
    assert table(render.machine_columns(), [], 80) == [
        "NAME  STATE  RPO  THRESHOLD  POLICY  PROCESS SERVER  MASTER TARGET  SYNC"
    ]


def test_missing_keys_print_a_dash() -> None:
    lines = table(render.disk_columns(), [{"disk_id": "sda"}], 200)
    assert lines[1].split() == ["sda", "-", "-", "-", "-", "-", "-", "-"]


def test_disk_sync_reads_done() -> None:
    lines = table(render.disk_columns(), [{"disk_id": "sda", "initial_done": True}], 200)
    assert "done" in lines[1]


def test_key_values_align_labels() -> None:
    assert render.key_values([("Job", "j-1"), ("Progress", "40%")], None) == [
        "     Job: j-1",
        "Progress: 40%",
    ]
