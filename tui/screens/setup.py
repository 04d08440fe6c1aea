"""The appliance setup wizard: network, hostname, time, roles, registration.

Each step is a form. Its values are checked here with the setup service's own
validators (appliance.setup.validate) before anything is sent; then a summary says
what will change, and only on "y" is the change applied through Setup1. A network
change the service refuses with NeedsConfirmation (it would cut the appliance off)
is asked about once more, then retried with confirm=true. Registration is a step only
when the chosen roles need a configuration server elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen, Screen
from textual.widgets import ContentSwitcher, Input, Label, OptionList, Static

from appliance.setup import validate
from appliance.setup.errors import InvalidArgument
from tui.client import ConsoleClient, describe_setup, record, records
from tui.widgets.ascii_checkbox import AsciiCheckbox
from tui.widgets.ascii_password import AsciiPassword
from tui.widgets.error_line import ErrorLine

STEPS = {
    "network": "Network",
    "hostname": "Hostname",
    "ntp": "Time",
    "roles": "Roles",
    "register": "Registration",
}
ROLE_NAMES = {"config": "configuration server", "process": "process server",
              "target": "master target"}  # fmt: skip
NEEDS_CONFIRMATION = "org.secondsite.Setup1.Error.NeedsConfirmation"
NONE = "(none)"
KEYS = "Enter/F2: review and apply  F3/F4: previous/next step  Tab: field  Esc: back"


class NothingToChange(Exception):
    """The form says what is already set."""


@dataclass(frozen=True)
class Change:
    """One Setup1 call and the lines that tell the operator what it changes."""

    title: str
    lines: tuple[str, ...]
    method: str
    args: tuple[Any, ...]


def split_list(text: str) -> list[str]:
    """Comma- or space-separated values as typed."""
    return text.replace(",", " ").split()


def _was(before: str, after: str) -> str:
    return after if before == after else f"{before} -> {after}"


def _joined(values: list[str]) -> str:
    return ", ".join(values) or NONE


def network_change(
    iface: dict[str, Any], dhcp: bool, addresses: str, gateway: str, dns: str
) -> Change:
    name = str(iface.get("name", ""))
    servers = [str(validate.dns_server(s)) for s in split_list(dns)]
    settings: dict[str, Any] = {"dns": servers}
    after_addresses, after_gateway = "(from DHCP)", "(from DHCP)"
    if dhcp:
        settings["method"] = "dhcp"
    else:
        parsed = [validate.interface_address(a) for a in split_list(addresses)]
        if not parsed:
            raise InvalidArgument("a static setup needs an address/prefix, e.g. 192.0.2.10/24")
        settings["method"] = "static"
        settings["addresses"] = [str(a) for a in parsed]
        after_addresses = _joined(settings["addresses"])
        after_gateway = NONE
        if gateway.strip():
            settings["gateway"] = str(validate.gateway(gateway, parsed))
            after_gateway = settings["gateway"]
    before = {
        "method": str(iface.get("method", "default")),
        "addresses": _joined([str(a) for a in iface.get("addresses", [])]),
        "gateway": str(iface.get("gateway", NONE)),
        "dns": _joined([str(s) for s in iface.get("dns", [])]),
    }
    mgmt = " (management)" if iface.get("management") else ""
    lines = (
        f"Interface {name}{mgmt}:",
        f"  method     {_was(before['method'], settings['method'])}",
        f"  addresses  {_was(before['addresses'], after_addresses)}",
        f"  gateway    {_was(before['gateway'], after_gateway)}",
        f"  DNS        {_was(before['dns'], _joined(servers))}",
        "Applied now and written to /etc/systemd/network for the next boot.",
    )
    return Change(f"Network: {name}", lines, "SetInterface", (name, settings, False))


def hostname_change(current: str, text: str) -> Change:
    name = validate.hostname(text)
    if name == current:
        raise NothingToChange(f"the hostname is already {name}")
    return Change("Hostname", (f"Hostname {_was(current or NONE, name)}",), "SetHostname", (name,))


def ntp_change(current: list[str], text: str) -> Change:
    servers = [validate.ntp_server(s) for s in split_list(text)]
    if servers == current:
        raise NothingToChange("the NTP servers are already " + _joined(servers))
    after = _joined(servers) if servers else "the servers DHCP or the image provide"
    lines = (f"NTP servers {_was(_joined(current), after)}",)
    return Change("Time", lines, "SetNtp", (servers,))


def enabled_roles(roles: dict[str, Any]) -> set[str]:
    return {name for name, state in roles.items() if record(state).get("enabled")}


def roles_change(current: dict[str, Any], wanted: set[str]) -> Change:
    lines = []
    for name, what in ROLE_NAMES.items():
        unit = record(current.get(name)).get("unit", f"secondsite-{name}.target")
        now = name in enabled_roles(current)
        if name in wanted and not now:
            lines.append(f"{what}: off -> on (enable and start {unit})")
        elif name not in wanted and now:
            lines.append(f"{what}: on -> off (disable and stop {unit})")
    if not lines:
        raise NothingToChange("these roles are already the ones enabled")
    if not wanted:
        lines.append("! No role at all: the appliance will run none of its services.")
    return Change("Roles", tuple(lines), "SetRoles", (sorted(wanted),))


def needs_registration(roles: set[str]) -> bool:
    """Process servers and master targets enrol with a configuration server elsewhere."""
    return "config" not in roles and bool(roles & {"process", "target"})


def register_change(address: str, passphrase: str) -> Change:
    host, port = validate.server_address(address)
    if not passphrase:
        raise InvalidArgument("the passphrase is empty (secondsitectl passphrase shows it)")
    lines = (
        f"Configuration server {host}:{port}",
        f"Enrolment passphrase: {len(passphrase)} characters (not shown)",
        "The role's daemon enrols with it when it starts.",
    )
    return Change("Registration", lines, "Register", (address.strip(), passphrase))


def interface_line(iface: dict[str, Any]) -> str:
    addresses = ",".join(str(a) for a in iface.get("addresses", [])) or "no address"
    mgmt = " mgmt" if iface.get("management") else ""
    state = "up" if iface.get("up") else "down"
    return (
        f"{iface.get('name', '?'):<10} {state:<4} {iface.get('method', '?'):<7} {addresses}{mgmt}"
    )


def result_line(change: Change, answer: object) -> str:
    if change.method == "SetInterface":
        iface = record(answer)
        line = f"Done: {interface_line(iface) if iface else change.title}"
        networkd = str(iface.get("networkd") or "reloaded")  # else: why the file waits
        return line if networkd == "reloaded" else f"{line}\n{networkd}"
    if change.method == "Register":
        done = record(answer)
        roles = record(done.get("roles"))
        line = f"Done: registered with {done.get('config_server', change.args[0])}"
        if not roles:
            return line + " (no process or target role here to enrol)"
        return line + "".join(
            f"\n{n}: {record(r).get('note', '')}" for n, r in sorted(roles.items())
        )
    if change.method == "SetRoles":
        states = record(answer)
        parts = [f"{n} {record(s).get('active_state', '?')}" for n, s in sorted(states.items())]
        return "Done: roles now " + ", ".join(parts)
    return f"Done: {change.title} " + change.lines[0]


class ReviewScreen(ModalScreen[bool]):
    """What a step will change (or a warning), dismissed with True on "y"."""

    DEFAULT_CSS = """
    ReviewScreen { align: center middle; }
    ReviewScreen > Vertical {
        width: 76; max-width: 100%; height: auto; max-height: 100%;
        border: solid $accent; padding: 0 1; background: $surface;
    }
    ReviewScreen #title { text-style: bold; margin-bottom: 1; }
    ReviewScreen #keys { margin-top: 1; }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "Apply"),
        Binding("escape,n", "answer(False)", "Back"),
    ]

    def __init__(self, title: str, lines: tuple[str, ...], go: str = "apply") -> None:
        super().__init__()
        self.title_text = title
        self.lines = lines
        self.go = go

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(self.title_text, id="title", markup=False)
            yield Static("\n".join(self.lines), id="lines", markup=False)
            yield Static(f"y: {self.go}   Esc or n: back, nothing changes", id="keys")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


def _field(label: str, widget: Input) -> Horizontal:
    return Horizontal(Label(label, classes="label"), widget, classes="field")


class SetupScreen(Screen[bool]):
    """Dismissed with True when at least one change was applied."""

    DEFAULT_CSS = """
    SetupScreen > Vertical { padding: 0 1; }
    SetupScreen #steps { text-style: bold; margin-bottom: 1; }
    SetupScreen ContentSwitcher { height: auto; }
    SetupScreen ContentSwitcher > Vertical { height: auto; }
    SetupScreen .field { height: 1; }
    SetupScreen .label { width: 24; }
    SetupScreen Input, SetupScreen Input:focus {
        border: none; height: 1; padding: 0 1; background: $boost; width: 1fr;
    }
    /* No "tall" border: its half-block glyphs are not in every VT font. */
    SetupScreen OptionList, SetupScreen OptionList:focus {
        border: none; height: auto; max-height: 4; padding: 0;
    }
    SetupScreen .note { margin-top: 1; }
    SetupScreen #result { height: auto; }
    SetupScreen #keys { dock: bottom; height: 1; }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "Back"),
        Binding("f2", "review", "Review and apply"),
        Binding("f3", "step(-1)", "Previous step"),
        Binding("f4", "step(1)", "Next step"),
    ]

    def __init__(self, setup: ConsoleClient) -> None:
        super().__init__()
        self.setup = setup
        self.step = "network"
        self.interfaces: list[dict[str, Any]] = []
        self.hostname = ""
        self.ntp: list[str] = []
        self.roles: dict[str, Any] = {}
        self.applied_any = False

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static("", id="steps", markup=False)
            with ContentSwitcher(initial="network"):
                with Vertical(id="network"):
                    yield Static("Interface (Up/Down):", markup=False)
                    yield OptionList(id="interfaces")
                    yield AsciiCheckbox("DHCP (off: the static settings below)", id="dhcp")
                    yield _field("Addresses (ip/prefix)", Input(id="addresses"))
                    yield _field("Gateway", Input(id="gateway"))
                    yield _field("DNS servers", Input(id="dns"))
                with Vertical(id="hostname"):
                    yield _field("Hostname", Input(id="hostname-input"))
                    yield Static("", id="hostname-now", classes="note", markup=False)
                with Vertical(id="ntp"):
                    yield _field("NTP servers", Input(id="ntp-input"))
                    yield Static(
                        "Comma-separated names or addresses; empty: the servers DHCP or "
                        "the image provide.",
                        classes="note",
                        markup=False,
                    )
                with Vertical(id="roles"):
                    for name, what in ROLE_NAMES.items():
                        yield AsciiCheckbox(what.capitalize(), id=f"role-{name}")
                    yield Static(
                        "Space: on/off. A process server or master target without the "
                        "configuration server registers with one in the next step.",
                        classes="note",
                        markup=False,
                    )
                with Vertical(id="register"):
                    yield _field("Configuration server", Input(id="address"))
                    yield _field("Passphrase", AsciiPassword(id="passphrase"))
                    yield Static(
                        "HOST[:PORT] (port 9440 if left out). The passphrase: run "
                        "secondsitectl passphrase on the configuration server.",
                        classes="note",
                        markup=False,
                    )
            yield ErrorLine(id="error")
            yield Static("", id="result", markup=False)
        yield Static(KEYS, id="keys")

    def on_mount(self) -> None:
        self._show_step()
        self._load()

    # -- steps --------------------------------------------------------------------------

    def steps(self) -> list[str]:
        wanted = self._wanted_roles()
        return [s for s in STEPS if s != "register" or needs_registration(wanted)]

    def _wanted_roles(self) -> set[str]:
        # query, not query_one: on a loaded machine the first step can be drawn before
        # the (hidden) roles step's checkboxes are in the DOM; none there = none wanted.
        return {
            n
            for n in ROLE_NAMES
            if any(box.value for box in self.query(f"#role-{n}").results(AsciiCheckbox))
        }

    def _show_step(self) -> None:
        bar = [
            f"[{i} {STEPS[s]}]" if s == self.step else f"{i} {STEPS[s]}"
            for i, s in enumerate(self.steps(), 1)
        ]
        self.query_one("#steps", Static).update("Setup: " + " > ".join(bar))
        self.query_one(ContentSwitcher).current = self.step

    def action_step(self, delta: int) -> None:
        steps = self.steps()
        i = steps.index(self.step) if self.step in steps else 0
        self.step = steps[max(0, min(len(steps) - 1, i + delta))]
        self._say(None)
        self._show_step()

    @on(AsciiCheckbox.Changed)
    def _roles_changed(self) -> None:
        self._show_step()  # registration comes and goes with the roles
        self._static_fields()

    def _static_fields(self) -> None:
        dhcp = self.query_one("#dhcp", AsciiCheckbox).value
        for key in ("#addresses", "#gateway"):
            self.query_one(key, Input).disabled = dhcp

    # -- loading ------------------------------------------------------------------------

    @work(group="load")
    async def _load(self) -> None:
        errors = []
        for method in ("GetNetwork", "GetHostname", "GetNtp", "GetRoles"):
            try:
                answer = await self.setup.call(method)
            except Exception as exc:
                message = describe_setup(exc)
                if message is None:
                    raise
                errors.append(f"{method}: {message}")
                continue
            self._loaded(method, answer)
        self._say(f"cannot read: {'; '.join(errors)}" if errors else None)

    def _loaded(self, method: str, answer: object) -> None:
        if method == "GetNetwork":
            self.interfaces = records(answer)
            options = self.query_one("#interfaces", OptionList)
            options.clear_options()
            options.add_options([interface_line(i) for i in self.interfaces])
            mgmt = [i for i, f in enumerate(self.interfaces) if f.get("management")]
            if self.interfaces:
                options.highlighted = mgmt[0] if mgmt else 0
        elif method == "GetHostname":
            self.hostname = str(answer)
            self.query_one("#hostname-input", Input).value = self.hostname
            self.query_one("#hostname-now", Static).update(f"Now: {self.hostname}")
        elif method == "GetNtp":
            self.ntp = [str(s) for s in answer] if isinstance(answer, list) else []
            self.query_one("#ntp-input", Input).value = ", ".join(self.ntp)
        elif method == "GetRoles":
            self.roles = record(answer)
            for name in ROLE_NAMES:
                box = self.query_one(f"#role-{name}", AsciiCheckbox)
                box.value = name in enabled_roles(self.roles)

    @on(OptionList.OptionHighlighted, "#interfaces")
    def _interface_chosen(self, event: OptionList.OptionHighlighted) -> None:
        iface = self.interfaces[event.option_index]
        static = iface.get("method") == "static"
        self.query_one("#dhcp", AsciiCheckbox).value = not static
        addresses = [str(a) for a in iface.get("addresses", [])] if static else []
        self.query_one("#addresses", Input).value = ", ".join(addresses)
        self.query_one("#gateway", Input).value = str(iface.get("gateway", "")) if static else ""
        self.query_one("#dns", Input).value = ", ".join(str(s) for s in iface.get("dns", []))
        self._static_fields()

    # -- review and apply ---------------------------------------------------------------

    def _change(self) -> Change:
        """The current step's change, from its form; InvalidArgument or NothingToChange."""
        value = lambda key: self.query_one(key, Input).value  # noqa: E731
        if self.step == "network":
            index = self.query_one("#interfaces", OptionList).highlighted
            if index is None or not self.interfaces:
                raise InvalidArgument("no interface to set up (the list is empty)")
            dhcp = self.query_one("#dhcp", AsciiCheckbox).value
            iface = self.interfaces[index]
            return network_change(
                iface, dhcp, value("#addresses"), value("#gateway"), value("#dns")
            )
        if self.step == "hostname":
            return hostname_change(self.hostname, value("#hostname-input"))
        if self.step == "ntp":
            return ntp_change(self.ntp, value("#ntp-input"))
        if self.step == "roles":
            return roles_change(self.roles, self._wanted_roles())
        return register_change(value("#address"), value("#passphrase"))

    def action_review(self) -> None:
        try:
            change = self._change()
        except InvalidArgument as exc:
            self._say(exc.message)
            return
        except NothingToChange as exc:
            self._say(None, f"Nothing to change: {exc}")
            return
        self._say(None)
        self._review_and_apply(change)

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_review()

    @work(exclusive=True, group="apply")
    async def _review_and_apply(self, change: Change) -> None:
        if not await self.app.push_screen_wait(
            ReviewScreen(f"{change.title}: apply?", change.lines)
        ):
            return
        self._say(None, "Applying...")
        args = change.args
        while True:
            try:
                answer = await self.setup.call(change.method, *args)
            except Exception as exc:
                message = describe_setup(exc)
                if message is None:
                    raise
                if getattr(exc, "name", "") == NEEDS_CONFIRMATION and args[-1] is False:
                    self._say(None, "")
                    warning = ReviewScreen(
                        "! This can cut the appliance off the network",
                        (message, "Apply it anyway?"),
                        go="apply anyway",
                    )
                    if await self.app.push_screen_wait(warning):
                        args = (*args[:-1], True)
                        continue
                    self._say(None, "Not applied.")
                    return
                self._say(f"{change.title} not applied: {message}", "")
                return
            break
        self._applied(change, answer)

    def _applied(self, change: Change, answer: object) -> None:
        self.applied_any = True
        self._say(None, result_line(change, answer))
        if change.method == "SetHostname":
            self._loaded("GetHostname", change.args[0])
        elif change.method == "SetNtp":
            self.ntp = list(change.args[0])
        elif change.method == "SetRoles":
            self._loaded("GetRoles", answer)
        elif change.method == "SetInterface":
            self._load()  # addresses may have moved: read them all back

    def _say(self, error: str | None, result: str | None = None) -> None:
        self.query_one(ErrorLine).show_error(error)
        if result is not None:
            self.query_one("#result", Static).update(result)

    def action_back(self) -> None:
        self.dismiss(self.applied_any)
