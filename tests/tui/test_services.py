"""The services view driven by Pilot at 80x24: against a fake Setup1 (states, the
journal, confirmation, refusals), and against the real secondsite-setupd driving a
real systemd (a user instance in private namespaces, tests/setup/user_systemd.py)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widgets import Static

from appliance.dbus.client import DBusCallError
from appliance.setup.firstboot import DONE, write_done
from appliance.setup.systemd import SystemdClient
from tests.setup.user_systemd import UserSystemd, user_systemd_instance
from tests.tui.fake import SERVICE_UNKNOWN, FakeClient
from tests.tui.test_console import SIZE, assert_fits, column, screenshot, text_of, until
from tests.tui.test_setup import FakeSetup, wait_answering
from tui.app import ConsoleApp
from tui.client import setup_client
from tui.screens.services import ServicesScreen
from tui.screens.setup import ReviewScreen
from tui.widgets.error_line import ErrorLine
from tui.widgets.units_table import UnitsTable

ERR = "org.secondsite.Setup1.Error."
REPO = Path(__file__).resolve().parents[2]
UNITS = [
    "secondsite-config.target", "secondsite-configd.service",
    "secondsite-process.target", "secondsite-processd.service",
    "secondsite-target.target", "secondsite-targetd.service",
]  # fmt: skip


class FakeServices(FakeSetup):
    def __init__(self) -> None:
        super().__init__()
        self.units = {u: {"unit": u, "active_state": "inactive", "sub_state": "dead",
                          "result": "success"} for u in UNITS}  # fmt: skip
        self.units["secondsite-config.target"].update(active_state="active", sub_state="active")
        self.units["secondsite-configd.service"].update(active_state="active", sub_state="running")
        self.units["secondsite-targetd.service"].update(
            active_state="failed", sub_state="failed", result="exit-code"
        )

    def _GetUnits(self) -> list[dict[str, Any]]:
        return list(self.units.values())

    def _set(self, unit: str, active: str, sub: str) -> dict[str, Any]:
        self.units[unit].update(active_state=active, sub_state=sub, result="success")
        return self.units[unit]

    def _StartUnit(self, unit: str) -> dict[str, Any]:
        return self._set(unit, "active", "running")

    _RestartUnit = _StartUnit

    def _StopUnit(self, unit: str) -> dict[str, Any]:
        return self._set(unit, "inactive", "dead")

    def _GetUnitJournal(self, unit: str, count: int) -> dict[str, Any]:
        if unit == "secondsite-processd.service":
            return {"unit": unit, "available": True, "note": "", "lines": []}
        lines = [
            {"time": "2026-11-26T04:00:00+00:00", "priority": 6, "message": f"{unit} line {i}"}
            for i in range(12)
        ]
        message = "cannot bind 0.0.0.0:9440: address in use\tsecond part"
        lines[-1] = {"time": "2026-11-26T04:00:09+00:00", "priority": 3, "message": message}
        return {"unit": unit, "available": True, "note": "", "lines": lines}

    def controls(self) -> list[tuple[str, tuple[Any, ...]]]:
        return [(m, a) for m, a in self.calls if m.endswith("Unit")]


Scenario = Callable[[ConsoleApp, Pilot[None], Any], Awaitable[None]]


def run(scenario: Scenario, setup: Any = None) -> Any:
    fake = setup if setup is not None else FakeServices()
    app = ConsoleApp(FakeClient(), refresh_s=60.0, setup=fake)

    async def main() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("s")
            await until(pilot, lambda: isinstance(app.screen, ServicesScreen))
            await pilot.pause()
            await scenario(app, pilot, fake)

    asyncio.run(main())
    return fake


def error(app: ConsoleApp) -> str | None:
    return app.screen.query_one(ErrorLine).message


def static(app: ConsoleApp, name: str) -> str:
    return text_of(app.screen.query_one(f"#{name}", Static))


def test_units_with_state_and_the_selected_units_journal() -> None:
    async def scenario(app: ConsoleApp, pilot: Pilot[None], fake: FakeServices) -> None:
        table = app.screen.query_one(UnitsTable)
        await until(pilot, lambda: "active (running)" in column(table, "STATE"))
        assert column(table, "UNIT") == UNITS
        assert column(table, "STATE") == [
            "active", "active (running)", "inactive (dead)", "inactive (dead)",
            "inactive (dead)", "!failed (exit-code)",
        ]  # fmt: skip
        assert column(table, "WHAT")[1] == "configuration server"
        await until(pilot, lambda: "line 10" in static(app, "journal"))
        assert static(app, "journal-title") == (
            "Journal of secondsite-config.target (last 8 lines)"
        )
        lines = static(app, "journal").splitlines()
        assert len(lines) == 8  # the last 8 of 12
        assert lines[0].endswith(" secondsite-config.target line 4")
        # An error is marked with "!" (no colour needed); a tab is a space.
        assert "!cannot bind 0.0.0.0:9440: address in use second part" in lines[-1]
        assert all(len(line) <= 78 for line in lines)
        assert_fits(app)
        screenshot(app, "services")
        await pilot.press("down", "down", "down")
        await until(pilot, lambda: "processd" in static(app, "journal-title"))
        await until(pilot, lambda: static(app, "journal") == "no journal entries")

    fake = run(scenario)
    journal_calls = [a for m, a in fake.calls if m == "GetUnitJournal"]
    assert ("secondsite-processd.service", 8) in journal_calls


def test_restart_asks_first_then_runs_and_shows_the_new_state() -> None:
    async def scenario(app: ConsoleApp, pilot: Pilot[None], fake: FakeServices) -> None:
        table = app.screen.query_one(UnitsTable)
        await until(pilot, lambda: table.row_count == 6)
        await pilot.press(*["down"] * 5)  # secondsite-targetd.service, failed
        await pilot.press("r")
        await until(pilot, lambda: isinstance(app.screen, ReviewScreen))
        assert static(app, "title") == "Restart secondsite-targetd.service?"
        screenshot(app, "services-confirm")
        await pilot.press("n")
        await until(pilot, lambda: isinstance(app.screen, ServicesScreen))
        assert fake.controls() == []
        await pilot.press("r")
        await until(pilot, lambda: isinstance(app.screen, ReviewScreen))
        await pilot.press("y")
        await until(pilot, lambda: "restarted" in static(app, "status"))
        assert static(app, "status") == (
            "secondsite-targetd.service restarted: now active (running)"
        )
        await until(pilot, lambda: column(table, "STATE")[-1] == "active (running)")
        await pilot.press("x", "y")
        await until(pilot, lambda: "stopped" in static(app, "status"))
        await pilot.press(*["up"] * 5, "t", "y")
        await until(pilot, lambda: len(fake.controls()) == 3)

    fake = run(scenario)
    assert fake.controls() == [
        ("RestartUnit", ("secondsite-targetd.service",)),
        ("StopUnit", ("secondsite-targetd.service",)),
        ("StartUnit", ("secondsite-config.target",)),
    ]


def test_refusals_and_an_unreachable_service_are_shown() -> None:
    fake = FakeServices()
    fake.fail["StopUnit"] = DBusCallError(
        ERR + "Failed", "stop secondsite-configd.service failed: it is active (deactivating)"
    )
    fake.fail["GetUnitJournal"] = DBusCallError(SERVICE_UNKNOWN, "no Setup1")

    async def scenario(app: ConsoleApp, pilot: Pilot[None], fake: FakeServices) -> None:
        table = app.screen.query_one(UnitsTable)
        await until(pilot, lambda: table.row_count == 6)
        await until(pilot, lambda: "cannot read the journal" in static(app, "journal"))
        await pilot.press("down", "x")
        await until(pilot, lambda: isinstance(app.screen, ReviewScreen))
        await pilot.press("y")
        await until(pilot, lambda: error(app) is not None)
        assert error(app) == ("stop secondsite-configd.service failed: it is active (deactivating)")
        assert static(app, "status") == "secondsite-configd.service not stopped"
        screenshot(app, "services-error")
        fake.fail["GetUnits"] = DBusCallError(SERVICE_UNKNOWN, "The name is not activatable")
        await pilot.press("g")
        await until(pilot, lambda: "cannot read the units" in (error(app) or ""))
        assert "setup service unreachable" in (error(app) or "")

    run(scenario, fake)


# -- against the real setup service and a real systemd -------------------------------

PROCESSD = """[Service]
ExecStart=/bin/sh -c 'echo processd up; exec sleep infinity'
"""


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[UserSystemd]:
    yield from user_systemd_instance(tmp_path)


@pytest.fixture
def setupd(tmp_path: Path, systemd: UserSystemd) -> Iterator[str]:
    setupd = Path(sys.executable).with_name("secondsite-setupd")
    if not setupd.exists():
        pytest.skip("secondsite-setupd is not installed in the venv")
    from appliance.lab.bus import start_private_bus

    directory = Path(tempfile.mkdtemp(prefix="secondsite-services-bus-"))
    policy = directory / "policy" / "org.secondsite.Setup1.conf"
    policy.parent.mkdir()
    conf = REPO / "units/dbus-1/system.d" / policy.name
    policy.write_text(conf.read_text().replace('group="secondsite"', 'group="nogroup"'))
    bus = start_private_bus(directory, [policy])
    (tmp_path / "root/etc").mkdir(parents=True)
    write_done(tmp_path / "root" / DONE, ["hostname"])  # set up: no offer of the wizard
    daemon = subprocess.Popen(
        [str(setupd), "--bus", bus.address, "--systemd-bus", systemd.address,
         "--networkd-bus", "none", "--root", str(tmp_path / "root"),
         "--state-dir", str(tmp_path / "state"), "--log-level", "warning"],
        cwd=REPO,
    )  # fmt: skip
    try:
        wait_answering(bus.address, "GetUnits", daemon)
        yield bus.address
    finally:
        daemon.terminate()
        daemon.wait(10)
        bus.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.integration
@pytest.mark.root
@pytest.mark.timeout(120)
def test_start_and_restart_through_the_real_setupd(systemd: UserSystemd, setupd: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    systemd.add_unit("secondsite-processd.service", PROCESSD)
    units = SystemdClient(systemd.address)
    app = ConsoleApp(FakeClient(), refresh_s=60.0, setup=setup_client(setupd))

    async def scenario(app: ConsoleApp, pilot: Pilot[None], _: object) -> None:
        table = app.screen.query_one(UnitsTable)
        await until(pilot, lambda: column(table, "STATE")[3] == "inactive (dead)", timeout=15)
        await pilot.press("down", "down", "down", "t", "y")
        await until(pilot, lambda: "started" in static(app, "status"), timeout=30)
        assert static(app, "status") == (
            "secondsite-processd.service started: now active (running)"
        )
        assert units.unit_status("secondsite-processd.service")["active_state"] == "active"
        await until(pilot, lambda: column(table, "STATE")[3] == "active (running)")
        # setupd reads the host's journal, where this private systemd's units are not.
        await until(pilot, lambda: "processd" in static(app, "journal-title"))
        await until(pilot, lambda: static(app, "journal") != "", timeout=15)
        assert static(app, "journal") in (
            "no journal on this appliance (is systemd-journald running?)",
            "no journal entries for secondsite-processd.service",
        )
        await pilot.press("r", "y")
        await until(pilot, lambda: "restarted" in static(app, "status"), timeout=30)
        await pilot.press("up", "up", "up", "t", "y")
        await until(pilot, lambda: "started" in static(app, "status"), timeout=30)
        assert units.unit_status("secondsite-config.target")["active_state"] == "active"

    async def main() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("s")
            await until(pilot, lambda: isinstance(app.screen, ServicesScreen))
            await scenario(app, pilot, None)

    asyncio.run(main())
