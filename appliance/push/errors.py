"""Push-install errors: one root, a leaf per way a host can refuse.

Every leaf is an operator-facing failure (one line and a hint, no traceback); the
``kind`` is a stable name a job step or the D-Bus layer can map to a named error."""

from __future__ import annotations

from typing import ClassVar


class PushError(Exception):
    kind: ClassVar[str] = "Failed"

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class Unreachable(PushError):
    """Nothing answers SSH at the address (refused, timed out, no route)."""

    kind = "Unreachable"


class BadCredentials(PushError):
    """The host refused the key (or the user)."""

    kind = "BadCredentials"


class HostKeyChanged(PushError):
    """The host presents a key other than the one trusted earlier: possibly an attack."""

    kind = "HostKeyChanged"

    def __init__(self, message: str, *, known: tuple[str, ...], offered: str) -> None:
        super().__init__(
            message,
            "if the host was reinstalled, check the new fingerprint out of band and "
            "remove its old entry from the known hosts",
        )
        self.known = known
        self.offered = offered


class UnknownHostKey(PushError):
    """First contact: the operator must confirm `fingerprint` (trust on first use)."""

    kind = "UnknownHostKey"

    def __init__(self, message: str, *, fingerprint: str) -> None:
        super().__init__(message, f"check it on the host, then accept {fingerprint}")
        self.fingerprint = fingerprint


class Unsupported(PushError):
    """OS, architecture, Python version or bundle that the agent cannot run on."""

    kind = "Unsupported"


class NoRoot(PushError):
    """The user is neither root nor allowed passwordless sudo."""

    kind = "NoRoot"


class DiskFull(PushError):
    """Not enough free space for the bundle or the installation."""

    kind = "DiskFull"


class CopyFailed(PushError):
    """The bundle did not arrive intact after the retries."""

    kind = "CopyFailed"


class InstallFailed(PushError):
    """A step on the host failed (venv, pip, enrolment, service)."""

    kind = "InstallFailed"


class BundleUnavailable(PushError):
    """No agent bundle for the host's platform could be built or found."""

    kind = "BundleUnavailable"
