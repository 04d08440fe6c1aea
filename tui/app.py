"""`secondsite-console`: the Textual console on the appliance's VM console and over SSH.

The App only wires things: which client, how often to poll, the global keys. The
screens do the work (tui/screens), each through the `ConsoleClient` it is given.
"""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from textual import work
from textual.app import App
from textual.binding import Binding, BindingType

from tui.client import ConsoleClient, ThreadedClient, describe_setup, record, setup_client
from tui.screens.dashboard import DashboardScreen
from tui.screens.help import HelpScreen
from tui.screens.services import ServicesScreen
from tui.screens.setup import SetupScreen

log = logging.getLogger(__name__)
DEFAULT_REFRESH_S = 2.0
JOB_POLL_S = 0.5  # as secondsitectl --wait


class ConsoleApp(App[None]):
    TITLE = "Secondsite"
    ENABLE_COMMAND_PALETTE = False  # keys are listed on each screen and under "?"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "Quit"),
        Binding("question_mark", "help", "Help"),
        Binding("s", "services", "Services"),
        Binding("w", "setup", "Appliance setup"),
    ]

    def __init__(
        self,
        client: ConsoleClient,
        *,
        refresh_s: float = DEFAULT_REFRESH_S,
        poll_s: float = JOB_POLL_S,
        setup: ConsoleClient | None = None,
    ) -> None:
        super().__init__()
        self.client = client
        # Setup1 is this appliance's own service: the system bus (or
        # $SECONDSITE_BUS_ADDRESS), not --bus, which may name a remote server's.
        self.setup = setup if setup is not None else setup_client()
        self.refresh_s = refresh_s
        self.poll_s = poll_s
        self.setup_state: dict[str, Any] | None = None  # Setup1 GetFirstBoot, once read

    def on_mount(self) -> None:
        self.push_screen(DashboardScreen(self.client, self.refresh_s, self.poll_s))
        self.offer_setup()

    @work(group="setup-state")
    async def offer_setup(self) -> None:
        """Open the setup wizard while neither first boot nor the wizard set the
        appliance up (Setup1 GetFirstBoot reads secondsite-firstboot's marker)."""
        try:
            state = record(await self.setup.call("GetFirstBoot"))
        except Exception as exc:
            message = describe_setup(exc)
            if message is None:
                raise
            log.info("not offering the setup wizard: %s", message)  # w still opens it
            return
        self.setup_state = state
        if state.get("firstboot_done") or state.get("wizard_done"):
            return
        self.action_setup()  # Esc goes to the dashboard; it opens again next start

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            bindings = [b for b in self.BINDINGS if isinstance(b, Binding)]
            self.push_screen(HelpScreen(self.screen, bindings))

    def action_services(self) -> None:
        if not isinstance(self.screen, ServicesScreen):
            self.push_screen(ServicesScreen(self.setup))

    def action_setup(self) -> None:
        if not isinstance(self.screen, SetupScreen):
            self.push_screen(SetupScreen(self.setup), self._setup_closed)

    def _setup_closed(self, applied: bool | None) -> None:
        if applied:
            self.finish_setup()

    @work(group="setup-state")
    async def finish_setup(self) -> None:
        """The wizard applied something: the appliance counts as set up from now on."""
        try:
            await self.setup.call("FinishSetup")
        except Exception as exc:
            message = describe_setup(exc)
            if message is None:
                raise
            self.notify(f"setup not recorded: {message}", severity="warning")

    def on_unmount(self) -> None:
        self.client.close()
        self.setup.close()


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0.2 <= value <= 3600:
        raise argparse.ArgumentTypeError("must be between 0.2 and 3600 seconds")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="secondsite-console",
        description="The Secondsite console: dashboard, machines, failover.",
    )
    parser.add_argument(
        "--bus",
        metavar="ADDRESS",
        help="D-Bus address of the configuration server "
        "(default: $SECONDSITE_BUS_ADDRESS, else the system bus)",
    )
    parser.add_argument(
        "--refresh",
        metavar="SECONDS",
        type=_seconds,
        default=DEFAULT_REFRESH_S,
        help=f"how often the screens poll (default {DEFAULT_REFRESH_S:g})",
    )
    return parser.parse_args(argv)


def _log_away_from_the_screen() -> None:
    """Textual draws on stderr, so a log record written there would scribble over the
    screen: records go to syslog (the journal) when there is one, else nowhere."""
    root = logging.getLogger()
    if Path("/dev/log").is_socket():
        handler: logging.Handler = logging.handlers.SysLogHandler("/dev/log")
        handler.setFormatter(logging.Formatter("secondsite-console: %(name)s: %(message)s"))
    else:
        handler = logging.NullHandler()
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    _log_away_from_the_screen()
    # No bus yet is not fatal: the dashboard says so and keeps trying.
    ConsoleApp(ThreadedClient(args.bus), refresh_s=args.refresh).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
