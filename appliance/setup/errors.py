"""The setup service's errors: one root, a leaf per kind of refusal.

Each leaf maps to `org.secondsite.Setup1.Error.<dbus_name>`; anything that is not a
SetupError is a bug and becomes the generic `Failed` with a pointer to the journal.
"""

from __future__ import annotations

from typing import ClassVar


class SetupError(Exception):
    dbus_name: ClassVar[str] = "Failed"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(SetupError):
    """A value of the wrong form: an address, prefix, hostname, role, setting name."""

    dbus_name = "InvalidArgument"


class NotFound(SetupError):
    """An interface (or unit) that does not exist."""

    dbus_name = "NotFound"


class NotAllowed(SetupError):
    """A unit that is not one of the appliance's own: Setup1 does not touch it."""

    dbus_name = "NotAllowed"


class NeedsConfirmation(SetupError):
    """The change would cut the appliance off; repeat it with confirm=true."""

    dbus_name = "NeedsConfirmation"


class Failed(SetupError):
    """The system refused a valid change (netlink, systemd, the filesystem)."""

    dbus_name = "Failed"
