"""Start, stop, restart and the journal of the appliance's units, against a real
systemd user instance with its own journald (tests/setup/user_systemd.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from appliance.setup.errors import Failed, InvalidArgument, NotAllowed
from appliance.setup.journal import NO_JOURNAL, Journal
from appliance.setup.services import ALLOWED, Services
from appliance.setup.systemd import SystemdClient
from tests.setup.user_systemd import UserSystemd

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.timeout(120)]

PROCESSD = """[Service]
ExecStart=/bin/sh -c 'echo processd up; exec sleep infinity'
"""
# A daemon that cannot start: the job itself fails, so the outcome is certain. It
# lingers a moment: journald names a line's unit from the writer's cgroup, which it
# cannot read once the writer is gone.
TARGETD = """[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'echo no identity: register first >&2; sleep 1; exit 3'
"""


@pytest.fixture
def services(user_systemd: UserSystemd) -> Services:
    user_systemd.add_unit("secondsite-processd.service", PROCESSD)
    user_systemd.add_unit("secondsite-targetd.service", TARGETD)
    return Services(SystemdClient(user_systemd.address), Journal(user_systemd.journalctl()))


def messages(services: Services, unit: str, expect: int) -> list[str]:
    """journald writes asynchronously: poll until `expect` lines are there."""
    deadline = time.monotonic() + 10
    while True:
        result = services.journal(unit, 50)
        lines = [str(line["message"]) for line in result.lines]
        if len(lines) >= expect or time.monotonic() > deadline:
            return lines


def test_start_restart_stop_with_journal(services: Services) -> None:
    unit = "secondsite-processd.service"
    assert services.status(unit)["active_state"] == "inactive"
    started = services.control("start", unit)
    assert started == {
        "unit": unit, "active_state": "active", "sub_state": "running", "result": "success",
    }  # fmt: skip
    assert messages(services, unit, 1) == ["processd up"]
    assert services.control("restart", unit)["active_state"] == "active"
    assert messages(services, unit, 2) == ["processd up", "processd up"]
    journal = services.journal(unit, 1)
    assert journal.available and len(journal.lines) == 1
    line = journal.lines[0]
    assert line["priority"] == 6 and line["time"].endswith("+00:00")
    assert services.control("stop", unit)["active_state"] == "inactive"
    listed = {s["unit"]: s["active_state"] for s in services.statuses()}
    assert list(listed) == [
        "secondsite-config.target", "secondsite-configd.service",
        "secondsite-process.target", "secondsite-processd.service",
        "secondsite-target.target", "secondsite-targetd.service",
    ]  # fmt: skip
    assert set(listed.values()) == {"inactive"}


def test_a_unit_that_fails_is_reported_with_its_journal(services: Services) -> None:
    unit = "secondsite-targetd.service"
    with pytest.raises(Failed, match=r"start secondsite-targetd.service failed: it is failed "
                       r"\(failed, result exit-code\)"):  # fmt: skip
        services.control("start", unit)
    assert services.status(unit)["active_state"] == "failed"
    assert "no identity: register first" in messages(services, unit, 1)
    # Stopping a failed unit is fine: it is not running afterwards.
    assert services.control("stop", unit)["active_state"] in ("inactive", "failed")


def test_only_the_appliances_units(services: Services) -> None:
    assert "secondsite-processd.service" in ALLOWED and "secondsite-process.target" in ALLOWED
    for unit in ["ssh.service", "fake-configd.service", "secondsite-setupd.service", ""]:
        with pytest.raises(NotAllowed, match="is not one of the appliance's units"):
            services.control("restart", unit)
        with pytest.raises(NotAllowed):
            services.journal(unit, 5)
    with pytest.raises(InvalidArgument, match="unknown unit action"):
        services.control("kill", "secondsite-processd.service")
    for count in (0, 501):
        with pytest.raises(InvalidArgument, match="between 1 and 500"):
            services.journal("secondsite-processd.service", count)


def test_a_unit_without_entries(services: Services) -> None:
    result = services.journal("secondsite-configd.service", 10)
    assert result.available and result.lines == []
    assert result.note == "no journal entries for secondsite-configd.service"


def test_no_journal_is_said_not_raised(tmp_path: Path) -> None:
    empty = tmp_path / "journal"
    empty.mkdir()
    no_files = Journal(["journalctl", "--directory", str(empty)]).lines("x.service", 5)
    assert (no_files.available, no_files.note, no_files.lines) == (False, NO_JOURNAL, [])
    missing = Journal([str(tmp_path / "journalctl")]).lines("x.service", 5)
    assert not missing.available and "journalctl is not installed" in missing.note
    broken = Journal(["journalctl", "--no-such-option"]).lines("x.service", 5)
    assert not broken.available and broken.note.startswith("journalctl failed: ")


def test_without_systemd_units_are_refused_but_the_journal_reads(tmp_path: Path) -> None:
    services = Services(None, Journal(["journalctl", "--directory", str(tmp_path)]))
    with pytest.raises(Failed, match="without systemd's bus"):
        services.control("start", "secondsite-processd.service")
    assert services.journal("secondsite-processd.service", 3).note == NO_JOURNAL
