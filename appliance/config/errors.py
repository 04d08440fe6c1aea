"""The configuration server's errors: one root, a leaf per kind of refusal.

Each leaf maps to a named D-Bus error (`org.secondsite.Config1.Error.<dbus_name>`)
and to an ok=false control-RPC answer; anything that is not a ConfigServerError is a
bug and becomes the generic `Failed` error."""

from __future__ import annotations

from typing import ClassVar


class ConfigServerError(Exception):
    dbus_name: ClassVar[str] = "Failed"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(ConfigServerError):
    """An unknown machine, disk, job, policy, server or point."""

    dbus_name = "NotFound"


class InvalidArgument(ConfigServerError):
    """A value of the wrong form or out of range."""

    dbus_name = "InvalidArgument"


class Conflict(ConfigServerError):
    """The request contradicts the current state (a job already running, a name taken)."""

    dbus_name = "Conflict"


class EnrolmentRefused(ConfigServerError):
    """Wrong or expired passphrase, replayed CSR, malformed CSR."""

    dbus_name = "EnrolmentRefused"


class NotAuthorised(ConfigServerError):
    """A revoked, expired or unknown certificate; a component asking for what is not its."""

    dbus_name = "NotAuthorised"
