"""Install the agent on a host, or remove it, through a process server over SSH.

The form (host, SSH user and port, a key file on this appliance or a password, the
disks to protect) is checked first (tui.push); a review says what will happen; only
on "y" is Config1 PushInstall (PushUninstall) called, and the job is followed on
JobScreen. The password field is emptied as the call is made, and the key file is
read for that call only: nothing secret stays in the console.

Host keys are trusted on first use, as with secondsitectl: the first job against a
new host fails before anything is copied, naming the key's fingerprint. The console
then shows it (HostKeyScreen), and when the operator accepts it (retyping the
password, which was not kept) runs the job again with accept_fingerprint. A changed
host key is refused by the process server; its reason is the job's error.
"""

from __future__ import annotations

from typing import Any, ClassVar

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen, Screen
from textual.widgets import Input, Label, Static

from appliance.config.model import JobState
from appliance.ctl.render import fmt_text
from tui import push
from tui.client import ConsoleClient, describe
from tui.screens.job import JobScreen
from tui.screens.setup import ReviewScreen
from tui.widgets.ascii_password import AsciiPassword
from tui.widgets.error_line import ErrorLine

KEYS = "Enter/F2: review  Tab: next field  Esc: back"
NOTE = (
    "Key file: an SSH private key without a passphrase, readable on this appliance. "
    "Or a password instead: used for this job only, never stored. The user is root "
    "or may sudo."
)
DISKS_NOTE = "Disks: device paths on the host, comma-separated."


def _first_contact(job: dict[str, Any]) -> bool:
    return push.first_contact(job) is not None


def _field(label: str, widget: Input) -> Horizontal:
    return Horizontal(Label(label, classes="label"), widget, classes="field")


class HostKeyScreen(ModalScreen[str | None]):
    """A first contact: the host's key fingerprint, to check and accept. Dismissed
    with the password typed again ("" with a key file), or None: not accepted."""

    DEFAULT_CSS = """
    HostKeyScreen { align: center middle; }
    HostKeyScreen > Vertical {
        width: 76; max-width: 100%; height: auto; max-height: 100%;
        border: solid $accent; padding: 0 1; background: $surface;
    }
    HostKeyScreen #title { text-style: bold; margin-bottom: 1; }
    HostKeyScreen #fingerprint { text-style: bold; margin: 1 0; }
    HostKeyScreen Input, HostKeyScreen Input:focus {
        border: none; height: 1; padding: 0 1; background: $boost;
    }
    HostKeyScreen #keys { margin-top: 1; }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "accept", "Accept the key"),
        Binding("escape,n", "back", "Back"),
    ]

    def __init__(
        self, host: str, fingerprint: str, *, ask_password: bool, verb: str = "install"
    ) -> None:
        super().__init__()
        self.host = host
        self.fingerprint = fingerprint
        self.ask_password = ask_password
        self.verb = verb  # what accepting goes on to do: install, remove

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(f"First contact with {self.host}", id="title", markup=False)
            yield Static(
                "The process server has never connected to this host: nothing was done "
                "there yet. The host presents the SSH host key:",
                markup=False,
            )
            yield Static(self.fingerprint, id="fingerprint", markup=False)
            yield Static(
                "Check it on the host before you accept it: ssh-keygen -lf with each "
                "/etc/ssh/ssh_host_*_key.pub lists the fingerprints there. Accepted, it is "
                "stored on the process server; a different key later is refused.",
                markup=False,
            )
            if self.ask_password:
                yield Static("Password again (it was not kept):", markup=False)
                yield AsciiPassword(id="password")
                yield ErrorLine(id="error")
                keys = f"Enter: accept the key and {self.verb}   Esc: back, nothing done"
            else:
                keys = f"y: accept the key and {self.verb}   Esc or n: back, nothing done"
            yield Static(keys, id="keys", markup=False)

    def action_accept(self) -> None:
        if not self.ask_password:
            self.dismiss("")
            return
        field = self.query_one("#password", AsciiPassword)
        password, field.value = field.value, ""
        if not password:
            self.query_one(ErrorLine).show_error("the password is empty")
            field.focus()
            return
        self.dismiss(password)

    def action_back(self) -> None:
        self.dismiss(None)

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_accept()


class PushScreen(Screen[bool]):
    """Install (or, with install=False, remove) the agent. Dismissed with True when a
    job succeeded, so the machine view can close after an uninstall."""

    DEFAULT_CSS = """
    PushScreen > Vertical { padding: 0 1; }
    PushScreen #title { text-style: bold; margin-bottom: 1; }
    PushScreen .field { height: 1; }
    PushScreen .label { width: 14; }
    PushScreen Input, PushScreen Input:focus {
        border: none; height: 1; padding: 0 1; background: $boost; width: 1fr;
    }
    PushScreen .note { margin-top: 1; }
    PushScreen #result { height: auto; }
    PushScreen #keys { dock: bottom; height: 1; }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "Back"),
        Binding("f2", "review", "Review and run"),
    ]

    def __init__(
        self,
        client: ConsoleClient,
        poll_s: float,
        *,
        install: bool = True,
        host: str = "",
        machine: str = "",
    ) -> None:
        super().__init__()
        self.client = client
        self.poll_s = poll_s
        self.install = install
        self.host = host
        self.machine = machine
        self.succeeded = False

    @property
    def what(self) -> str:
        return "Install the agent" if self.install else "Remove the agent"

    @property
    def method(self) -> str:
        return "PushInstall" if self.install else "PushUninstall"

    def compose(self) -> ComposeResult:
        title = f"{self.what} on a host" if self.install else f"{self.what} of {self.machine}"
        with Vertical():
            yield Static(title, id="title", markup=False)
            yield _field("Host", Input(self.host, id="host"))
            yield _field("SSH user", Input(push.DEFAULT_USER, id="user"))
            yield _field("SSH port", Input(str(push.DEFAULT_PORT), id="port"))
            yield _field("Key file", Input(id="key-file", placeholder="/path/on/appliance"))
            yield _field("Password", AsciiPassword(id="password"))
            if self.install:
                yield _field("Disks", Input(id="disks", placeholder="/dev/sdb, /dev/sdc"))
            yield _field("Machine name", Input(self.machine, id="machine", placeholder="= host"))
            notes = f"{NOTE} {DISKS_NOTE}" if self.install else NOTE
            yield Static(notes, classes="note", markup=False)
            yield ErrorLine(id="error")
            yield Static("", id="result", markup=False)
        yield Static(KEYS, id="keys")

    def on_mount(self) -> None:
        self.query_one("#user" if self.host else "#host", Input).focus()

    def _value(self, key: str) -> str:
        return self.query_one(key, Input).value

    def _target(self) -> push.Target:
        return push.parse_target(
            host=self._value("#host"),
            user=self._value("#user"),
            port=self._value("#port"),
            key_file=self._value("#key-file"),
            password=self._value("#password"),
            machine=self._value("#machine"),
            disks=self._value("#disks") if self.install else None,
        )

    def action_review(self) -> None:
        try:
            target = self._target()
        except push.FormError as exc:
            self._say(str(exc), "")
            return
        self._say(None, "")
        self.run_job(target)

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_review()

    def _take_password(self) -> str:
        """The typed password, emptied from the field: it is not kept after the call."""
        field = self.query_one("#password", AsciiPassword)
        password, field.value = field.value, ""
        return password

    @work(exclusive=True, group="push")
    async def run_job(self, target: push.Target) -> None:
        warn = "" if self.install else "! "  # its replication stops: marked as ConfirmScreen does
        title = f"{warn}{self.what}: {target.host}?"
        review = ReviewScreen(title, push.review_lines(target, install=self.install),
                              go="install" if self.install else "remove")  # fmt: skip
        if not await self.app.push_screen_wait(review):
            return
        password = self._take_password() if target.uses_password else ""
        accept: str | None = None
        while True:
            job = await self._call(target, password, accept)
            password = ""
            if job is None:
                return
            follow = JobScreen(self.client, job, self.poll_s, leave_when=_first_contact)
            ended = await self.app.push_screen_wait(follow)
            fingerprint = push.first_contact(ended) if ended else None
            if fingerprint is None:
                self._ended(job, ended)
                return
            verb = "install" if self.install else "remove"
            answer = await self.app.push_screen_wait(
                HostKeyScreen(
                    target.host, fingerprint, ask_password=target.uses_password, verb=verb
                )
            )
            if answer is None:
                self._say(f"Host key of {target.host} not accepted: nothing was done", "")
                return
            accept, password = fingerprint, answer

    async def _call(self, target: push.Target, password: str, accept: str | None) -> str | None:
        """Start the job; the options (the secret in them) live for this call only."""
        try:
            options = push.options(target, password, accept, install=self.install)
        except push.FormError as exc:
            self._say(str(exc), "")
            return None
        try:
            return str(await self.client.call(self.method, target.host, options))
        except Exception as exc:
            text = describe(exc)
            if text is None:
                raise
            self._say(f"{self.what} refused: {text}", "")
            return None
        finally:
            options.clear()

    def _ended(self, job: str, record: dict[str, Any] | None) -> None:
        state = (record or {}).get("state")
        if state == JobState.SUCCEEDED:
            self.succeeded = True
            done = "installed and enrolled" if self.install else "removed, machine forgotten"
            self._say(None, f"Done: agent {done} (job {job}).")
        elif state in (JobState.FAILED, JobState.CANCELLED):
            error = fmt_text((record or {}).get("error") or "no error recorded")
            self._say(f"Job {job} {state}: {error}", "")
        else:  # left the job screen while it runs
            self._say(None, f"Job {job} goes on: secondsitectl job {job}")

    def _say(self, error: str | None, result: str) -> None:
        self.query_one(ErrorLine).show_error(error)
        self.query_one("#result", Static).update(result)

    def action_back(self) -> None:
        self.dismiss(self.succeeded)
