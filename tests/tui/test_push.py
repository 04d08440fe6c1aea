"""Install and remove the agent from the console, keyboard only at 80x24, against the
fake configuration server (the real one is in test_console_configd.py).

What the operator types goes in key by key; what they see is read back from the
screens (error line, review lines, job progress, the host key dialog), and what the
console sent from the fake's record of calls.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widgets import Input, Static

from appliance.dbus.client import DBusCallError
from tests.tui.fake import FakeClient
from tests.tui.test_console import open_web1, run, screenshot, text_of, until
from tui.app import ConsoleApp
from tui.screens.dashboard import DashboardScreen
from tui.screens.help import HelpScreen
from tui.screens.job import JobScreen
from tui.screens.push import HostKeyScreen, PushScreen
from tui.screens.setup import ReviewScreen
from tui.widgets.error_line import ErrorLine
from tui.widgets.job_progress import JobProgress

FP = "SHA256:3q2+7w9cX0mFQbqEV0vEYc3s0WnLrQ1w0ZOkzJ8m4Dc"
FIRST_CONTACT = {
    "state": "failed", "step": "install", "percent": 2.0,
    "error": f"src1 presents the host key {FP}, not trusted yet: check it on the host "
             f"(ssh-keygen -lf), then run again with --accept-fingerprint {FP}",
    "result": {"detail": "host-key: first connection"},
}  # fmt: skip
KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNz\n-----END OPENSSH PRIVATE KEY-----\n"


async def type_in(pilot: Pilot[None], text: str) -> None:
    await pilot.press(*text)  # one key per character, as typed


async def to_field(app: ConsoleApp, pilot: Pilot[None], name: str) -> Input:
    """Tab (or Shift+Tab) to the field: keyboard only."""
    chain = [w.id for w in app.screen.focus_chain]
    here = chain.index(app.focused.id if app.focused is not None else chain[0])
    steps = chain.index(name) - here
    await pilot.press(*(["tab"] * steps if steps > 0 else ["shift+tab"] * -steps))
    assert app.focused is not None and app.focused.id == name
    assert isinstance(app.focused, Input)
    return app.focused


async def fill(app: ConsoleApp, pilot: Pilot[None], **values: str) -> None:
    for name, value in values.items():
        field = await to_field(app, pilot, name.replace("_", "-"))
        await pilot.press("ctrl+a", "shift+end")  # select what is there: typing replaces it
        await type_in(pilot, value) if value else await pilot.press("backspace")
        assert field.value == value


def error(app: ConsoleApp) -> str | None:
    return app.screen.query_one(ErrorLine).message


async def open_install(app: ConsoleApp, pilot: Pilot[None]) -> PushScreen:
    await pilot.press("i")
    await until(pilot, lambda: isinstance(app.screen, PushScreen))
    assert isinstance(app.screen, PushScreen)
    return app.screen


async def review(app: ConsoleApp, pilot: Pilot[None]) -> str:
    await pilot.press("enter")
    await until(pilot, lambda: isinstance(app.screen, ReviewScreen))
    return text_of(app.screen.query_one("#lines", Static))


async def job_shown(app: ConsoleApp, pilot: Pilot[None], check: str) -> str:
    """Wait until the job screen's progress shows `check`; its whole text."""
    await until(pilot, lambda: isinstance(app.screen, JobScreen))
    progress = app.screen.query_one(JobProgress)
    await until(pilot, lambda: check in str(progress.render()))
    return str(progress.render())


def pushes(fake: FakeClient) -> list[tuple[str, dict[str, Any]]]:
    return [(args[0], args[1]) for m, args in fake.calls if m.startswith("Push")]


@pytest.mark.slow  # typed key by key: about 60 ms a key under Pilot
def test_the_form_refuses_bad_values_before_anything_is_sent() -> None:
    async def scenario(app: ConsoleApp, pilot: Pilot[None], fake: FakeClient) -> None:
        keys = text_of(app.screen.query_one("#keys", Static))
        assert "i install agent" in keys and len(keys) <= 80
        screen = await open_install(app, pilot)
        await pilot.press("enter")
        assert error(app) == "the host is empty: a name or address the process server can reach"
        refusals = [
            ({"host": "-oX"}, "is not a host name or an IP address"),
            ({"host": "src1"}, "fill in one of key file or password (not both)"),
            ({"key_file": "/k", "password": "pw"}, "(not both)"),
            ({"key_file": "k", "password": ""}, "give the absolute path"),
            ({"key_file": "", "password": "pw"}, "name at least one disk to protect"),
            ({"disks": "sdb"}, "device paths on the host, e.g. /dev/sdb: not sdb"),
            ({"disks": "/dev/sdb", "port": "99999"}, "port '99999' is not a TCP port"),
            ({"port": "22", "user": "bad user"}, "user 'bad user' is not a user name"),
        ]
        for values, said in refusals:
            await fill(app, pilot, **values)
            await pilot.press("enter")
            assert said in (error(app) or ""), (values, error(app))
            assert app.screen is screen  # no review: the form says what is wrong
        screenshot(app, "install-form-error")
        assert pushes(fake) == []
        await pilot.press("escape")
        await until(pilot, lambda: isinstance(app.screen, DashboardScreen))

    run(scenario)


@pytest.mark.slow  # typed key by key: about 60 ms a key under Pilot
def test_first_contact_shows_the_fingerprint_then_installs_with_it() -> None:
    fake = FakeClient()
    fake.job_states = [FIRST_CONTACT]

    async def scenario(app: ConsoleApp, pilot: Pilot[None], fake: FakeClient) -> None:
        screen = await open_install(app, pilot)
        await fill(app, pilot, host="src1", password="s3cret-pw", disks="/dev/sdb, /dev/sdc")
        lines = await review(app, pilot)
        assert "Login      a password (typed, not shown, not stored)" in lines
        assert "Disks      /dev/sdb, /dev/sdc" in lines and "s3cret" not in lines
        screenshot(app, "install-review")
        await pilot.press("y")

        # The job fails before anything is copied; the console asks about the key.
        await until(pilot, lambda: isinstance(app.screen, HostKeyScreen))
        shown = text_of(app.screen.query_one("#fingerprint", Static))
        assert shown == FP
        (host, sent), = pushes(fake)  # fmt: skip
        assert host == "src1" and "accept_fingerprint" not in sent
        assert sent == {"user": "root", "machine": "src1", "password": "s3cret-pw",
                        "disks": ["/dev/sdb", "/dev/sdc"]}  # fmt: skip
        assert screen.query_one("#password", Input).value == ""  # not kept after the call
        screenshot(app, "install-host-key")

        # Accepting asks for the password again: it was not kept.
        copied = {"detail": "copy: agent bundle copied (1.2 MiB)"}
        fake.job_states = [{"state": "running", "step": "install", "percent": 15.0,
                            "result": copied}]  # fmt: skip
        await pilot.press("enter")
        assert app.screen.query_one(ErrorLine).message == "the password is empty"
        await type_in(pilot, "s3cret-pw")
        await pilot.press("enter")
        text = await job_shown(app, pilot, "Detail: copy: agent bundle copied (1.2 MiB)")
        assert "15%" in text and "RUNNING  install" in text
        screenshot(app, "install-job")
        fake.job_states = [{"state": "running", "step": "install", "percent": 70.0,
                            "result": {"detail": "configure: unit written"}}]  # fmt: skip
        text = await job_shown(app, pilot, "Detail: configure: unit written")
        assert "copy:" not in text  # the latest step's line, not a log
        fake.job_states = [{"state": "succeeded", "step": "enrolled", "percent": 100.0,
                            "result": {"detail": "service: agent started"}}]  # fmt: skip
        await job_shown(app, pilot, "SUCCEEDED")
        (_, first), (_, second) = pushes(fake)
        assert second == first | {"accept_fingerprint": FP}
        await pilot.press("escape")
        await until(pilot, lambda: app.screen is screen)
        result = text_of(screen.query_one("#result", Static))
        assert result == "Done: agent installed and enrolled (job job-42)."
        assert error(app) is None and screen.query_one("#password", Input).value == ""

    run(scenario, fake)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """Paths to type in key by key: pytest's tmp_path is 80 characters long."""
    with tempfile.TemporaryDirectory(prefix="k", dir="/tmp") as name:
        yield Path(name)


@pytest.mark.slow  # typed key by key: about 60 ms a key under Pilot
def test_a_key_file_is_read_for_the_call_and_a_declined_key_stops(short_dir: Path) -> None:
    key = short_dir / "id"
    key.write_text(KEY)
    not_a_key = short_dir / "txt"
    not_a_key.write_text("hello\n")
    fake = FakeClient()
    fake.job_states = [FIRST_CONTACT]

    async def scenario(app: ConsoleApp, pilot: Pilot[None], fake: FakeClient) -> None:
        screen = await open_install(app, pilot)
        await fill(app, pilot, host="src1", key_file=str(short_dir / "no"), disks="/dev/sdb")
        await review(app, pilot)
        await pilot.press("y")
        await until(pilot, lambda: error(app) is not None)
        assert "cannot read the key file" in (error(app) or "")
        assert "No such file or directory" in (error(app) or "")
        await fill(app, pilot, key_file=str(not_a_key))
        await review(app, pilot)
        await pilot.press("y")
        await until(pilot, lambda: "is not a private key" in (error(app) or ""))
        assert pushes(fake) == []

        await fill(app, pilot, key_file=str(key), user="admin", port="2222", machine="erp-db")
        lines = await review(app, pilot)
        assert f"the key in {key} (read now, not stored)" in lines
        assert "Host       src1 port 2222" in lines and "Machine    erp-db" in lines
        await pilot.press("y")
        await until(pilot, lambda: isinstance(app.screen, HostKeyScreen))
        keys = text_of(app.screen.query_one("#keys", Static))
        assert keys.startswith("y: accept the key")  # no password to type again
        await pilot.press("n")  # not checked: nothing more is done
        await until(pilot, lambda: app.screen is screen)
        assert error(app) == "Host key of src1 not accepted: nothing was done"
        (_, sent), = pushes(fake)  # fmt: skip
        assert sent == {"user": "admin", "machine": "erp-db", "port": 2222, "key": KEY,
                        "disks": ["/dev/sdb"]}  # fmt: skip

    run(scenario, fake)


def test_a_changed_host_key_is_refused_with_the_reason() -> None:
    fake = FakeClient()
    reason = (
        "HostKeyChanged: src1: host key changed: it offers ssh-ed25519 SHA256:new, trusted "
        "is ssh-ed25519 SHA256:old (if the host was reinstalled, check the new fingerprint "
        "out of band and remove its old entry from the known hosts)"
    )
    fake.job_states = [{"state": "failed", "step": "install", "percent": 2.0, "error": reason}]

    async def scenario(app: ConsoleApp, pilot: Pilot[None], fake: FakeClient) -> None:
        screen = await open_install(app, pilot)
        await fill(app, pilot, host="src1", password="pw", disks="/dev/sdb")
        await review(app, pilot)
        await pilot.press("y")
        text = await job_shown(app, pilot, "FAILED")
        assert "host key changed" in text and "SHA256:old" in text
        assert isinstance(app.screen, JobScreen)  # no offer to accept it
        screenshot(app, "install-key-changed")
        await pilot.press("escape")
        await until(pilot, lambda: app.screen is screen)
        assert error(app) == f"Job job-42 failed: {reason}"
        assert len(pushes(fake)) == 1

    run(scenario, fake)


def test_a_refused_call_shows_the_servers_error_and_drops_the_password() -> None:
    fake = FakeClient()
    fake.fail["PushInstall"] = DBusCallError(
        "org.secondsite.Config1.Error.InvalidArgument", "disks must be device paths, e.g. /dev/sdb"
    )

    async def scenario(app: ConsoleApp, pilot: Pilot[None], fake: FakeClient) -> None:
        screen = await open_install(app, pilot)
        await fill(app, pilot, host="src1", password="pw", disks="/dev/sdb")
        await review(app, pilot)
        await pilot.press("y")
        await until(pilot, lambda: error(app) is not None)
        assert (error(app) or "").startswith("Install the agent refused: ")
        assert "disks must be device paths" in (error(app) or "")
        assert app.screen is screen and screen.query_one("#password", Input).value == ""
        screenshot(app, "install-refused")

    run(scenario, fake)


def test_remove_agent_from_the_machine_view() -> None:
    fake = FakeClient()
    fake.machines[0]["hostname"] = "web1.example.org"

    async def scenario(app: ConsoleApp, pilot: Pilot[None], fake: FakeClient) -> None:
        machine = await open_web1(app, pilot)
        await until(pilot, lambda: machine.hostname == "web1.example.org")
        keys = text_of(machine.query_one("#keys", Static))
        assert "a remove agent" in keys and all(len(x) <= 80 for x in keys.splitlines())
        await pilot.press("a")
        await until(pilot, lambda: isinstance(app.screen, PushScreen))
        assert app.screen.query_one("#host", Input).value == "web1.example.org"
        assert not app.screen.query("#disks")
        await fill(app, pilot, password="pw")
        lines = await review(app, pilot)
        assert "certificates are revoked" in lines
        title = text_of(app.screen.query_one("#title", Static))
        assert title == "! Remove the agent: web1.example.org?"  # replication stops
        screenshot(app, "remove-agent-review")
        await pilot.press("y")
        await job_shown(app, pilot, "SUCCEEDED")
        sent = {"user": "root", "machine": "web1", "password": "pw"}
        assert pushes(fake) == [("web1.example.org", sent)]
        assert fake.methods().count("PushUninstall") == 1
        await pilot.press("escape")
        result = lambda: text_of(app.screen.query_one("#result", Static))  # noqa: E731
        await until(pilot, lambda: result().startswith("Done: agent removed"))
        await pilot.press("escape")  # the machine is gone: back to the dashboard
        await until(pilot, lambda: isinstance(app.screen, DashboardScreen))

    run(scenario, fake)


def test_help_lists_the_agent_keys() -> None:
    async def scenario(app: ConsoleApp, pilot: Pilot[None], fake: FakeClient) -> None:
        await pilot.press("question_mark")
        await until(pilot, lambda: isinstance(app.screen, HelpScreen))
        assert "i              Install agent" in str(app.screen.query_one(Static).render())
        await pilot.press("escape")
        await open_web1(app, pilot)
        await pilot.press("question_mark")
        await until(pilot, lambda: isinstance(app.screen, HelpScreen))
        assert "a              Remove agent" in str(app.screen.query_one(Static).render())

    run(scenario)
