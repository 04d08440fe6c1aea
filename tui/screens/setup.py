"""Placeholder for the first-boot setup wizard (network, hostname, time, roles,
registration): it applies through the setup service, which is still being built."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import Static

MESSAGE = """\
Appliance setup is not available yet.

The setup wizard (network, hostname, time, roles, registration with a
configuration server) applies its changes through the setup service
(org.secondsite.Setup1), which this appliance does not have yet.

Until then the image runs every role with DHCP networking. To enrol a
process server or master target with a configuration server, use
  secondsite-processd --enroll HOST:PORT --passphrase-file FILE
  secondsite-targetd --enroll HOST:PORT --passphrase-file FILE
and on the configuration server: secondsitectl passphrase"""


class SetupScreen(Screen[None]):
    DEFAULT_CSS = """
    SetupScreen > Vertical { padding: 1 2; }
    SetupScreen #keys { dock: bottom; height: 1; }
    """

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "back", "Back")]

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(MESSAGE, id="message", markup=False)
        yield Static("Esc: back", id="keys")

    def action_back(self) -> None:
        self.dismiss(None)
