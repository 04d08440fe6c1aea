"""The console's screens driven by Pilot at 80x24 against a fake configuration server.

What the operator sees is read back from the widgets (table cells, the error line);
the SVG screenshots of each screen go to test-output/tui/ for a person to look at.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from rich.text import Text
from textual.pilot import Pilot
from textual.widgets import DataTable, Static

from appliance.dbus.client import DBusCallError
from tests.tui.fake import CONFLICT, SERVICE_UNKNOWN, FakeClient
from tui.app import ConsoleApp, parse_args
from tui.client import ThreadedClient
from tui.screens.confirm import ConfirmScreen
from tui.screens.dashboard import DashboardScreen
from tui.screens.job import JobScreen
from tui.screens.machine import MachineScreen
from tui.widgets.alerts_list import AlertsList
from tui.widgets.error_line import ErrorLine
from tui.widgets.fitted_table import FittedTable
from tui.widgets.job_progress import JobProgress
from tui.widgets.machines_table import MachinesTable
from tui.widgets.servers_table import ServersTable

SIZE = (80, 24)
SHOTS = Path(__file__).resolve().parents[2] / "test-output" / "tui"

Scenario = Callable[[ConsoleApp, Pilot[None], FakeClient], Awaitable[None]]


def run(scenario: Scenario, client: FakeClient | None = None) -> FakeClient:
    fake = client or FakeClient()
    # A long refresh: the tests refresh with "g" when they want to, nothing races them.
    app = ConsoleApp(fake, refresh_s=60.0, poll_s=0.01)

    async def main() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: isinstance(app.screen, DashboardScreen))
            await scenario(app, pilot, fake)

    asyncio.run(main())
    return fake


async def until(pilot: Pilot[None], check: Callable[[], object], timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if check():
            return
        await pilot.pause(0.02)
    raise AssertionError(f"timed out waiting for {check}")


def rows(table: DataTable[Any]) -> list[list[str]]:
    def plain(cell: object) -> str:
        return (cell.plain if isinstance(cell, Text) else str(cell)).strip()

    return [[plain(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


def column(table: DataTable[Any], header: str) -> list[str]:
    headers = [str(c.label) for c in table.columns.values()]
    i = headers.index(header)
    return [row[i] for row in rows(table)]


def text_of(widget: Static) -> str:
    return str(widget.render())


def screenshot(app: ConsoleApp, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    svg = SHOTS / f"{name}.svg"
    svg.write_text(app.export_screenshot(title=name))
    if shutil.which("rsvg-convert"):
        subprocess.run(["rsvg-convert", "-o", str(svg.with_suffix(".png")), str(svg)], check=True)


def assert_fits(app: ConsoleApp) -> None:
    """No table scrolls sideways, and nothing drawn is wider than the screen."""
    for table in app.screen.query(FittedTable):
        if table.display:
            assert table.max_scroll_x == 0, f"{table.id} scrolls sideways"
            assert table.virtual_size.width <= table.size.width, table.id


async def loaded(app: ConsoleApp, pilot: Pilot[None]) -> MachinesTable:
    table = app.screen.query_one(MachinesTable)
    await until(pilot, lambda: table.row_count == 3)
    return table


def test_dashboard_shows_machines_servers_and_alerts() -> None:
    async def scenario(app: ConsoleApp, pilot: Pilot[None], fake: FakeClient) -> None:
        table = await loaded(app, pilot)
        assert column(table, "MACHINE") == ["web1", "db1", "app1"]
        assert column(table, "STATE") == ["protected", "rpo-exceeded", "initial-sync"]
        # Over the threshold is marked with "!", not only by colour; no point yet is "-".
        assert column(table, "RPO") == ["4s", "!16m40s", "-"]
        assert column(table, "RATE")[0] == "2.0 MiB/s"
        assert column(table, "SYNC") == ["done", "done", "[##....]  42%"]
        servers = rows(app.screen.query_one(ServersTable))
        assert [r[0] for r in servers] == ["ps1", "mt1"]
        assert servers[1][2] == "!no"  # the master target is not reporting
        (alert,) = rows(app.screen.query_one(AlertsList))
        assert alert[0] == "CRIT" and "exceeds the threshold" in alert[-1]
        summary = text_of(app.screen.query_one("#summary", Static))
        assert "3 machines" in summary and "!1 over RPO" in summary
        assert "worst RPO 16m40s" in summary
        assert_fits(app)
        screenshot(app, "dashboard")

    run(scenario)


def test_refresh_updates_values_and_the_trend_history() -> None:
    async def scenario(app: ConsoleApp, pilot: Pilot[None], fake: FakeClient) -> None:
        table = await loaded(app, pilot)
        dashboard = app.screen
        assert isinstance(dashboard, DashboardScreen)
        fake.machines[0]["rpo_seconds"] = 1200.0
        fake.machines[0]["state"] = "rpo-exceeded"
        fake.alerts.clear()
        await pilot.press("g")
        await until(pilot, lambda: column(table, "RPO")[0] == "!20m00s")
        assert column(table, "STATE")[0] == "rpo-exceeded"
        assert app.screen.query_one(AlertsList).row_count == 0
        assert len(dashboard.rpo_history) == 2 and dashboard.rpo_history.latest() == 1200.0
        assert dashboard.rate_history.latest() == 3 * fake.rate

    run(scenario)


def test_enter_opens_the_machine_view() -> None:
    async def scenario(app: ConsoleApp, pilot: Pilot[None], fake: FakeClient) -> None:
        await loaded(app, pilot)
        await pilot.press("down", "enter")  # the second row: db1
        await until(pilot, lambda: isinstance(app.screen, MachineScreen))
        screen = app.screen
        assert isinstance(screen, MachineScreen) and screen.machine == "db1"
        disks = screen.query_one("#disks", DataTable)
        await until(pilot, lambda: disks.row_count == 1)
        assert rows(disks)[0][:3] == ["/dev/sda", "20.0 GiB", "done"]
        details = text_of(screen.query_one("#details", Static))
        assert "!16m40s OVER" in details and "master target mt1" in details
        assert ("ListPoints", ("db1",)) in fake.calls
        await pilot.press("2")
        points = screen.query_one("#points", DataTable)
        assert points.display and column(points, "KIND") == ["crash", "app"]
        await pilot.press("3")
        events = screen.query_one("#events", DataTable)
        assert [r[-1] for r in rows(events)] == ["db1 is rpo-exceeded"]  # db1's only
        assert_fits(app)
        screenshot(app, "machine")
        await pilot.press("escape")
        await until(pilot, lambda: isinstance(app.screen, DashboardScreen))

    run(scenario)


async def open_web1(app: ConsoleApp, pilot: Pilot[None]) -> MachineScreen:
    await loaded(app, pilot)
    await pilot.press("enter")
    await until(pilot, lambda: isinstance(app.screen, MachineScreen))
    screen = app.screen
    assert isinstance(screen, MachineScreen)
    return screen


def test_protect_confirms_calls_and_follows_the_job() -> None:
    async def scenario(app: ConsoleApp, pilot: Pilot[None], fake: FakeClient) -> None:
        await open_web1(app, pilot)
        await pilot.press("p")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        effect = text_of(app.screen.query_one("#effect", Static))
        assert "Starts replicating web1" in effect
        screenshot(app, "confirm-protect")
        assert "Protect" not in fake.methods()  # nothing happens before the yes
        await pilot.press("y")
        await until(pilot, lambda: isinstance(app.screen, JobScreen))
        progress = app.screen.query_one(JobProgress)
        await until(pilot, lambda: progress.state == "succeeded")
        assert ("Protect", ("web1", "")) in fake.calls
        assert fake.methods().count("GetJob") >= 3
        assert "SUCCEEDED" in str(progress.render()) and "[####" in str(progress.render())
        screenshot(app, "job")
        await pilot.press("escape")
        await until(pilot, lambda: isinstance(app.screen, MachineScreen))

    run(scenario)


def test_backing_out_of_the_dialog_calls_nothing() -> None:
    async def scenario(app: ConsoleApp, pilot: Pilot[None], fake: FakeClient) -> None:
        await open_web1(app, pilot)
        await pilot.press("m")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        assert "cannot be cancelled" in text_of(app.screen.query_one("#effect", Static))
        await pilot.press("escape")
        await until(pilot, lambda: isinstance(app.screen, MachineScreen))
        assert "Commit" not in fake.methods()

    run(scenario)


def test_test_failover_takes_the_point_from_the_dialog() -> None:
    async def scenario(app: ConsoleApp, pilot: Pilot[None], fake: FakeClient) -> None:
        await open_web1(app, pilot)
        await pilot.press("t")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        # The point field has the focus and holds "latest": replace it with a tag.
        await pilot.press("ctrl+u", *"web1-app-0001", "enter")
        await until(pilot, lambda: isinstance(app.screen, JobScreen))
        assert ("TestFailover", ("web1", "web1-app-0001", {})) in fake.calls

    run(scenario)


def test_unplanned_failover_is_chosen_in_the_dialog() -> None:
    async def scenario(app: ConsoleApp, pilot: Pilot[None], fake: FakeClient) -> None:
        await open_web1(app, pilot)
        await pilot.press("f")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        screenshot(app, "confirm-failover")
        await pilot.press("tab", "space", "y")  # to the checkbox, tick it, go ahead
        await until(pilot, lambda: isinstance(app.screen, JobScreen))
        assert ("Failover", ("web1", "latest", "unplanned")) in fake.calls

    run(scenario)


def test_a_refused_action_shows_the_servers_message() -> None:
    fake = FakeClient()
    fake.fail["Protect"] = DBusCallError(CONFLICT, "web1 already has a running job")

    async def scenario(app: ConsoleApp, pilot: Pilot[None], fake: FakeClient) -> None:
        screen = await open_web1(app, pilot)
        await pilot.press("p", "y")
        error = screen.query_one(ErrorLine)
        await until(pilot, lambda: error.message is not None)
        assert error.message == "Protect refused: web1 already has a running job"
        assert isinstance(app.screen, MachineScreen) and error.display
        screenshot(app, "refused")

    run(scenario, fake)


def test_a_failed_job_shows_its_error() -> None:
    fake = FakeClient()
    fake.job_states = [{"state": "failed", "step": "place", "error": "no master target"}]

    async def scenario(app: ConsoleApp, pilot: Pilot[None], fake: FakeClient) -> None:
        await open_web1(app, pilot)
        await pilot.press("r", "y")
        await until(pilot, lambda: isinstance(app.screen, JobScreen))
        progress = app.screen.query_one(JobProgress)
        await until(pilot, lambda: progress.state == "failed")
        shown = str(progress.render())
        assert "! FAILED" in shown and "Error: no master target" in shown

    run(scenario, fake)


def test_server_down_is_said_and_the_console_keeps_going() -> None:
    fake = FakeClient()
    fake.fail["Status"] = DBusCallError(SERVICE_UNKNOWN, "The name is not activatable")

    async def scenario(app: ConsoleApp, pilot: Pilot[None], fake: FakeClient) -> None:
        error = app.screen.query_one(ErrorLine)
        await until(pilot, lambda: error.message is not None)
        assert error.message is not None
        assert "configuration server unreachable" in error.message
        assert "systemctl status secondsite-configd" in error.message
        screenshot(app, "server-down")
        del fake.fail["Status"]  # it comes back
        await pilot.press("g")
        await loaded(app, pilot)
        await until(pilot, lambda: error.message is None)

    run(scenario, fake)


def test_long_names_are_cut_not_scrolled() -> None:
    fake = FakeClient()
    fake.machines[0]["name"] = "a-very-long-machine-name-from-the-cmdb-01.example.org"
    fake.machines[0]["state"] = "failover-committed"
    fake.alerts[0]["message"] = "x" * 200

    async def scenario(app: ConsoleApp, pilot: Pilot[None], fake: FakeClient) -> None:
        table = await loaded(app, pilot)
        name = column(table, "MACHINE")[0]
        assert name.endswith("~") and name.startswith("a-very-long")
        assert column(table, "STATE")[0] == "fo-committed"
        assert_fits(app)

    run(scenario, fake)


def test_help_screen() -> None:
    # The services view and the setup wizard are tested in test_setup.py.
    async def scenario(app: ConsoleApp, pilot: Pilot[None], fake: FakeClient) -> None:
        await pilot.press("question_mark")
        await until(pilot, lambda: len(app.screen_stack) > 2)
        screenshot(app, "help")
        await pilot.press("escape", "q")

    fake = run(scenario)
    assert fake.closed


def test_flags() -> None:
    args = parse_args(["--bus", "unix:path=/tmp/bus", "--refresh", "5"])
    assert (args.bus, args.refresh) == ("unix:path=/tmp/bus", 5.0)
    assert parse_args([]).bus is None


def test_no_bus_at_all_is_said_with_the_real_client(tmp_path: Path) -> None:
    app = ConsoleApp(ThreadedClient(f"unix:path={tmp_path}/no-bus"), refresh_s=60.0)

    async def main() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: isinstance(app.screen, DashboardScreen))
            error = app.screen.query_one(ErrorLine)
            await until(pilot, lambda: error.message is not None)
            assert error.message is not None
            assert "cannot connect to unix:path=" in error.message
            assert "is dbus running?" in error.message

    asyncio.run(main())
