"""The setup wizard driven by Pilot at 80x24: against a fake
Setup1 (steps, form refusals, confirmation, service errors), and once against the real
secondsite-setupd on a private bus (hostname and NTP, in a UTS namespace of its own)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widgets import Static

from appliance.dbus.client import DBusCallError
from appliance.setup.firstboot import DONE, write_done
from tests.tui.fake import FakeClient
from tests.tui.test_console import SIZE, screenshot, text_of, until
from tui.app import ConsoleApp
from tui.client import setup_client
from tui.screens.dashboard import DashboardScreen
from tui.screens.services import ServicesScreen
from tui.screens.setup import ReviewScreen, SetupScreen
from tui.widgets.ascii_checkbox import AsciiCheckbox
from tui.widgets.error_line import ErrorLine

ERR = "org.secondsite.Setup1.Error."
REPO = Path(__file__).resolve().parents[2]


def role(name: str, on: bool) -> dict[str, Any]:
    return {"unit": f"secondsite-{name}.target", "enabled": on, "active": on,
            "unit_file_state": "enabled" if on else "disabled",
            "active_state": "active" if on else "inactive"}  # fmt: skip


class FakeSetup(FakeClient):
    """Setup1 with state: what the wizard sets is what it reads back."""

    def __init__(self) -> None:
        super().__init__()
        self.net = [
            {"name": "ens192", "mac": "00:50:56:00:00:01", "state": "up", "up": True,
             "addresses": ["192.0.2.10/24"], "gateway": "192.0.2.1", "method": "default",
             "dns": ["192.0.2.53"], "management": True},
            {"name": "ens224", "state": "down", "up": False, "addresses": [],
             "method": "default", "dns": [], "management": False},
        ]  # fmt: skip
        self.host = "localhost"
        self.servers: list[str] = []  # type: ignore[assignment]
        self.roles = {"config": role("config", True), "process": role("process", False),
                      "target": role("target", False)}  # fmt: skip
        self.firstboot = True  # set up at first boot: no offer of the wizard
        self.networkd = "systemd-networkd is not running: the file applies at the next boot"
        self.finished = False

    def _GetNetwork(self) -> list[dict[str, Any]]:
        return self.net

    def _SetInterface(self, name: str, settings: dict[str, Any], confirm: bool) -> dict[str, Any]:
        iface = next(i for i in self.net if i["name"] == name)
        if iface["management"] and settings.get("method") == "static" and not confirm:
            raise DBusCallError(ERR + "NeedsConfirmation", f"{name} would lose 192.0.2.10/24")
        iface.update(settings)
        return {**iface, "networkd": self.networkd}

    def _GetHostname(self) -> str:
        return self.host

    def _SetHostname(self, name: str) -> None:
        self.host = name

    def _GetNtp(self) -> list[str]:
        return self.servers

    def _SetNtp(self, servers: list[str]) -> None:
        self.servers = servers

    def _GetRoles(self) -> dict[str, Any]:
        return self.roles

    def _SetRoles(self, names: list[str]) -> dict[str, Any]:
        self.roles = {n: role(n, n in names) for n in self.roles}
        return self.roles

    def _Register(self, address: str, passphrase: str) -> dict[str, Any]:
        note = f"enrolled with {address}:9440; secondsite-processd.service started"
        unit = "secondsite-processd.service"
        return {"config_server": f"{address}:9440",
                "roles": {"process": {"unit": unit, "enrolled": True, "note": note}}}  # fmt: skip

    def _GetFirstBoot(self) -> dict[str, Any]:
        return {"firstboot_done": self.firstboot, "applied": [], "wizard_done": self.finished}

    def _FinishSetup(self) -> None:
        self.finished = True

    def sets(self) -> list[tuple[str, tuple[Any, ...]]]:
        return [(m, a) for m, a in self.calls if not m.startswith("Get") and m != "FinishSetup"]


Scenario = Callable[[ConsoleApp, Pilot[None], FakeSetup], Awaitable[None]]


def run(scenario: Scenario, setup: FakeSetup | None = None, key: str = "w") -> FakeSetup:
    fake = setup or FakeSetup()
    app = ConsoleApp(FakeClient(), refresh_s=60.0, setup=fake)

    async def main() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press(key)
            screen = SetupScreen if key == "w" else ServicesScreen
            await until(pilot, lambda: isinstance(app.screen, screen))
            await until(pilot, lambda: len(fake.calls) >= (4 if key == "w" else 1))
            await pilot.pause()
            await scenario(app, pilot, fake)

    asyncio.run(main())
    return fake


def error(app: ConsoleApp) -> str | None:
    return app.screen.query_one(ErrorLine).message


def result(app: ConsoleApp) -> str:
    return text_of(app.screen.query_one("#result", Static))


async def fill(app: ConsoleApp, pilot: Pilot[None], **values: str) -> None:
    for key, value in values.items():
        app.screen.query_one(f"#{key.replace('_', '-')}").value = value  # type: ignore[attr-defined]
    await pilot.pause()


async def review(app: ConsoleApp, pilot: Pilot[None]) -> str:
    """Press F2 and return the summary's lines."""
    await pilot.press("f2")
    await until(pilot, lambda: isinstance(app.screen, ReviewScreen))
    return text_of(app.screen.query_one("#lines", Static))


def test_hostname_step_refuses_in_the_form_then_shows_the_change_and_applies() -> None:
    async def scenario(app: ConsoleApp, pilot: Pilot[None], fake: FakeSetup) -> None:
        assert "[1 Network]" in text_of(app.screen.query_one("#steps", Static))
        assert "Registration" not in text_of(app.screen.query_one("#steps", Static))
        screenshot(app, "setup-network")
        await pilot.press("f4")
        assert "[2 Hostname]" in text_of(app.screen.query_one("#steps", Static))
        await fill(app, pilot, hostname_input="bad_name")
        await pilot.press("f2")
        assert error(app) is not None and "bad_name" in error(app)  # type: ignore[operator]
        assert fake.sets() == []
        await fill(app, pilot, hostname_input="dr-ps1")
        assert "Hostname localhost -> dr-ps1" in await review(app, pilot)
        screenshot(app, "setup-review")
        await pilot.press("y")
        await until(pilot, lambda: "Done" in result(app))
        assert fake.sets() == [("SetHostname", ("dr-ps1",))]
        await pilot.press("f2")  # the same name again: nothing to do, nothing sent
        assert "Nothing to change" in result(app)
        assert len(fake.sets()) == 1

    run(scenario)


def test_network_static_is_validated_then_confirmed_and_retried() -> None:
    async def scenario(app: ConsoleApp, pilot: Pilot[None], fake: FakeSetup) -> None:
        app.screen.query_one("#dhcp", AsciiCheckbox).value = False
        await fill(app, pilot, addresses="192.0.2.20", gateway="", dns="")
        await pilot.press("f2")
        assert "needs a prefix length" in (error(app) or "")
        await fill(app, pilot, addresses="192.0.2.20/24", gateway="198.51.100.1")
        await pilot.press("f2")
        assert "is not inside 192.0.2.0/24" in (error(app) or "")
        assert fake.sets() == []
        await fill(app, pilot, gateway="192.0.2.1", dns="192.0.2.53, 192.0.2.54")
        lines = await review(app, pilot)
        assert "Interface ens192 (management)" in lines
        assert "addresses  192.0.2.10/24 -> 192.0.2.20/24" in lines
        assert "DNS        192.0.2.53 -> 192.0.2.53, 192.0.2.54" in lines
        await pilot.press("y")
        await until(pilot, lambda: isinstance(app.screen, ReviewScreen))  # the warning
        assert "would lose 192.0.2.10/24" in text_of(app.screen.query_one("#lines", Static))
        screenshot(app, "setup-confirm")
        await pilot.press("y")
        await until(pilot, lambda: "Done" in result(app))
        assert result(app).splitlines()[1] == fake.networkd  # why a reboot is still needed
        settings = {"method": "static", "addresses": ["192.0.2.20/24"],
                    "gateway": "192.0.2.1", "dns": ["192.0.2.53", "192.0.2.54"]}  # fmt: skip
        assert fake.sets() == [
            ("SetInterface", ("ens192", settings, False)),
            ("SetInterface", ("ens192", settings, True)),
        ]

    run(scenario)


def test_declining_the_confirmation_changes_nothing() -> None:
    async def scenario(app: ConsoleApp, pilot: Pilot[None], fake: FakeSetup) -> None:
        app.screen.query_one("#dhcp", AsciiCheckbox).value = False
        await fill(app, pilot, addresses="192.0.2.20/24", gateway="", dns="")
        await review(app, pilot)
        await pilot.press("y")
        await until(pilot, lambda: getattr(app.screen, "go", "") == "apply anyway")
        await pilot.press("n")
        await until(pilot, lambda: "Not applied" in result(app))
        assert [a[2] for _, a in fake.sets()] == [False]

    run(scenario)


def test_an_error_from_the_service_is_shown() -> None:
    fake = FakeSetup()
    fake.fail["SetNtp"] = DBusCallError(ERR + "Failed", "cannot write timesyncd.conf.d")

    async def scenario(app: ConsoleApp, pilot: Pilot[None], fake: FakeSetup) -> None:
        await pilot.press("f4", "f4")
        await fill(app, pilot, ntp_input="ntp1.example.org, 192.0.2.123")
        assert "NTP servers (none) -> ntp1.example.org, 192.0.2.123" in await review(app, pilot)
        await pilot.press("y")
        await until(pilot, lambda: error(app) is not None)
        assert error(app) == "Time not applied: cannot write timesyncd.conf.d"
        screenshot(app, "setup-error")

    assert run(scenario, fake).sets() == [("SetNtp", (["ntp1.example.org", "192.0.2.123"],))]


def test_roles_then_registration_only_without_the_configuration_role() -> None:
    async def scenario(app: ConsoleApp, pilot: Pilot[None], fake: FakeSetup) -> None:
        await pilot.press("f4", "f4", "f4")
        steps = app.screen.query_one("#steps", Static)
        assert "[4 Roles]" in text_of(steps)
        app.screen.query_one("#role-config", AsciiCheckbox).value = False
        app.screen.query_one("#role-process", AsciiCheckbox).value = True
        await pilot.pause()
        assert "5 Registration" in text_of(steps)
        lines = await review(app, pilot)
        assert "configuration server: on -> off" in lines
        assert "process server: off -> on (enable and start secondsite-process.target)" in lines
        await pilot.press("n")  # back out: nothing sent
        await pilot.pause()
        assert fake.sets() == []
        await review(app, pilot)
        await pilot.press("y")
        await until(pilot, lambda: "Done" in result(app))
        assert fake.sets() == [("SetRoles", (["process"],))]
        await pilot.press("f4")
        assert "[5 Registration]" in text_of(steps)
        await fill(app, pilot, address="cs.example.org:99999", passphrase="s3cret")
        await pilot.press("f2")
        assert "port '99999'" in (error(app) or "")
        await fill(app, pilot, address="cs.example.org")
        lines = await review(app, pilot)
        assert "Configuration server cs.example.org:9440" in lines and "s3cret" not in lines
        await pilot.press("y")
        await until(pilot, lambda: len(fake.sets()) == 2)
        assert fake.sets()[-1] == ("Register", ("cs.example.org", "s3cret"))
        await until(pilot, lambda: "registered" in result(app))
        assert result(app).splitlines() == [
            "Done: registered with cs.example.org:9440",
            "process: enrolled with cs.example.org:9440; secondsite-processd.service started",
        ]

    run(scenario)


# -- against the real setup service --------------------------------------------------


@pytest.fixture
def setupd(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    setupd = Path(sys.executable).with_name("secondsite-setupd")
    if os.geteuid() != 0 or shutil.which("unshare") is None or not setupd.exists():
        pytest.skip("needs root and unshare (sethostname in a UTS namespace)")
    from appliance.lab.bus import start_private_bus

    directory = Path(tempfile.mkdtemp(prefix="secondsite-console-bus-"))
    # As tests/setup: the secondsite group does not exist on build machines.
    policy = directory / "policy" / "org.secondsite.Setup1.conf"
    policy.parent.mkdir()
    conf = REPO / "units/dbus-1/system.d" / policy.name
    policy.write_text(conf.read_text().replace('group="secondsite"', 'group="nogroup"'))
    bus = start_private_bus(directory, [policy])
    (tmp_path / "etc").mkdir()
    if "offer" not in request.node.name:  # set up at first boot: no offer of the wizard
        write_done(tmp_path / DONE, ["hostname"])
    # A UTS namespace of its own: SetHostname must not rename the build machine.
    daemon = subprocess.Popen(
        ["unshare", "--uts", str(setupd),
         "--bus", bus.address, "--systemd-bus", "none", "--root", str(tmp_path),
         "--state-dir", str(tmp_path / "state"), "--log-level", "warning"],
        cwd=REPO,
    )  # fmt: skip
    try:
        wait_answering(bus.address, "GetHostname", daemon)
        yield bus.address
    finally:
        daemon.terminate()
        daemon.wait(10)
        bus.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.integration
@pytest.mark.root
@pytest.mark.timeout(120)
def test_hostname_and_ntp_through_the_real_setupd(setupd: str, tmp_path: Path) -> None:
    app = ConsoleApp(FakeClient(), refresh_s=60.0, setup=setup_client(setupd))

    async def main() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("w")
            await until(pilot, lambda: isinstance(app.screen, SetupScreen))
            hostname = app.screen.query_one("#hostname-input")
            await until(pilot, lambda: hostname.value != "", timeout=15)  # type: ignore[attr-defined]
            await pilot.press("f4")
            await fill(app, pilot, hostname_input="dr-console-test")
            await review(app, pilot)
            await pilot.press("y")
            await until(pilot, lambda: "Done" in result(app), timeout=15)
            await pilot.press("f4")
            await fill(app, pilot, ntp_input="bad..name")
            await pilot.press("f2")
            assert "NTP server" in (error(app) or "")
            await fill(app, pilot, ntp_input="ntp.example.org")
            await review(app, pilot)
            await pilot.press("y")
            await until(pilot, lambda: "Done" in result(app), timeout=15)

    asyncio.run(main())
    assert (tmp_path / "etc/hostname").read_text() == "dr-console-test\n"
    conf = "".join(p.read_text() for p in (tmp_path / "etc/systemd/timesyncd.conf.d").iterdir())
    assert "ntp.example.org" in conf


@pytest.mark.integration
@pytest.mark.root
@pytest.mark.timeout(120)
def test_offer_of_the_wizard_until_the_appliance_is_set_up(setupd: str, tmp_path: Path) -> None:
    """No first-boot marker: the console opens on the wizard; once a change was applied
    with it, setupd records that and the next console start opens the dashboard."""

    async def first_start() -> None:
        app = ConsoleApp(FakeClient(), refresh_s=60.0, setup=setup_client(setupd))
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: isinstance(app.screen, SetupScreen), timeout=15)
            # Over the dashboard: Esc leads there.
            assert isinstance(app.screen_stack[-2], DashboardScreen)
            # The screen is current before its widgets are all in the DOM.
            await until(pilot, lambda: bool(app.screen.query("#hostname-input")), timeout=15)
            hostname = app.screen.query_one("#hostname-input")
            await until(pilot, lambda: hostname.value != "", timeout=15)  # type: ignore[attr-defined]
            await pilot.press("f4")
            await fill(app, pilot, hostname_input="dr-offer-test")
            await review(app, pilot)
            await pilot.press("y")
            await until(pilot, lambda: "Done" in result(app), timeout=15)
            await pilot.press("escape")
            await until(pilot, (tmp_path / "state/setup.done").exists, timeout=15)

    async def second_start() -> None:
        app = ConsoleApp(FakeClient(), refresh_s=60.0, setup=setup_client(setupd))
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: isinstance(app.screen, DashboardScreen))
            # GetFirstBoot answered (wizard_done): the worker ends, no offer came up.
            await until(pilot, lambda: offer_done(app), timeout=15)
            assert isinstance(app.screen, DashboardScreen)

    asyncio.run(first_start())
    asyncio.run(second_start())


def offer_done(app: ConsoleApp) -> bool:
    return app.setup_state is not None


def test_no_offer_when_first_boot_set_the_appliance_up() -> None:
    fake = FakeSetup()  # firstboot_done
    app = ConsoleApp(FakeClient(), refresh_s=60.0, setup=fake)

    async def main() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: offer_done(app))
            await pilot.pause()
            assert isinstance(app.screen, DashboardScreen)

    asyncio.run(main())
    assert fake.methods() == ["GetFirstBoot"]


def test_offer_left_without_a_change_then_the_dashboard() -> None:
    fake = FakeSetup()
    fake.firstboot = False
    app = ConsoleApp(FakeClient(), refresh_s=60.0, setup=fake)

    async def main() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: isinstance(app.screen, SetupScreen))
            steps = app.screen.query_one("#steps", Static)
            await until(pilot, lambda: text_of(steps).startswith("Setup: "))  # boot-test.sh
            await pilot.press("escape")
            await until(pilot, lambda: isinstance(app.screen, DashboardScreen))

    asyncio.run(main())
    assert "FinishSetup" not in fake.methods()


def wait_answering(address: str, method: str, daemon: subprocess.Popen[bytes]) -> None:
    """Until the setupd just started on `address` answers `method` (20 s, or it died)."""
    client = setup_client(address)
    deadline = time.monotonic() + 20
    try:
        while True:
            try:
                asyncio.run(client.call(method))
                return
            except DBusCallError:
                if time.monotonic() > deadline or daemon.poll() is not None:
                    raise
                time.sleep(0.2)
    finally:
        client.close()
