"""The console with its real client against a real configuration server.

configd on a private system-like bus with our policy, a master target and a process
server enrolled with the passphrase, and an agent on a loop ext4 disk; the console's
ThreadedClient (dbus-python on its own thread) talks to that bus. The dashboard must
list both servers and the machine, and the machine view its disk. Installing an agent
from the console on a site with no process server fails in the job, with the server's
reason on the screen.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from textual.widgets import DataTable

from appliance.lab.bus import PrivateBus
from tests.conftest import TlsMaterial
from tests.integration.configsite import Site, machine, start_site
from tests.loopfs import loop_ext4
from tests.tui.test_console import SIZE, column, screenshot, until
from tests.tui.test_push import fill, job_shown, open_install, review
from tui.app import ConsoleApp
from tui.client import ThreadedClient
from tui.screens.dashboard import DashboardScreen
from tui.screens.machine import MachineScreen
from tui.screens.push import PushScreen
from tui.widgets.error_line import ErrorLine
from tui.widgets.machines_table import MachinesTable
from tui.widgets.servers_table import ServersTable

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.slow]


@pytest.fixture
def site(
    tmp_path: Path, private_bus_factory: Callable[..., PrivateBus], tls: TlsMaterial
) -> Iterator[Site]:
    yield from start_site(tmp_path, private_bus_factory, tls)


def test_dashboard_lists_the_real_servers_and_machine(site: Site, tmp_path: Path) -> None:
    site.servers(tmp_path / "datastore")
    with loop_ext4(tmp_path, 32) as (device, _mnt):
        agent = site.agent(device)
        try:
            site.wait("web1 enrolled with its disk",
                      lambda: (m := machine(site, "web1")) and m.get("disks"))  # fmt: skip
            asyncio.run(drive(site))
        finally:
            agent.terminate()  # before its disk goes away
            agent.wait(timeout=30)


async def drive(site: Site) -> None:
    app = ConsoleApp(ThreadedClient(site.bus.address), refresh_s=1.0)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.screen, DashboardScreen))
        machines = app.screen.query_one(MachinesTable)
        servers = app.screen.query_one(ServersTable)
        await until(pilot, lambda: machines.row_count >= 1 and servers.row_count == 2, 30)
        assert column(machines, "MACHINE") == ["web1"]
        assert sorted(column(servers, "SERVER")) == ["process", "target"]
        assert sorted(column(servers, "ROLE")) == ["master-tgt", "process"]
        screenshot(app, "dashboard-configd")
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, MachineScreen))
        disks = app.screen.query_one("#disks", DataTable)
        await until(pilot, lambda: disks.row_count == 1, 30)
        assert column(disks, "DISK")[0].startswith("/dev/loop")

        # The server refuses a commit here (a protect job may still be running, and this
        # site has no vCenter): the console shows the server's reason and goes on.
        await pilot.press("m", "y")
        error = app.screen.query_one(ErrorLine)
        await until(pilot, lambda: error.message is not None, 30)
        message = error.message or ""
        assert message.startswith("Commit failover refused: "), message
        assert any(r in message for r in ("failover is not configured", "job running"))
        screenshot(app, "refused-configd")
        assert isinstance(app.screen, MachineScreen)


def test_install_agent_without_a_process_server(site: Site) -> None:
    asyncio.run(install_without_process_server(site))


async def install_without_process_server(site: Site) -> None:
    app = ConsoleApp(ThreadedClient(site.bus.address), refresh_s=1.0)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.screen, DashboardScreen))
        form = await open_install(app, pilot)
        await fill(app, pilot, host="src1", password="pw", disks="/dev/sdb")
        await review(app, pilot)
        await pilot.press("y")
        # configd takes the call (a job), then its place step finds no process server.
        text = await job_shown(app, pilot, "FAILED")
        assert "push-install of push:src1" in text
        assert "Error: no process server is enrolled; enrol one first" in text
        screenshot(app, "install-configd")
        await pilot.press("escape")
        await until(pilot, lambda: app.screen is form)
        message = form.query_one(ErrorLine).message or ""
        assert message.startswith("Job ") and message.endswith(
            " failed: no process server is enrolled; enrol one first"
        ), message
        assert isinstance(app.screen, PushScreen)
