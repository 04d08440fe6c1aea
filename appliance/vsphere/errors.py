"""Errors of the vSphere layer: one root, specific leaves.

Every leaf is an operator-facing condition (a vCenter that does not answer, a wrong
password, a full datastore, a name collision) whose message fits on one line. Faults
that vSphere raises are translated into these in `tasks.translate`; pyVmomi types do
not leak to callers, so the job engine can match on this module alone.
"""

from __future__ import annotations


class VSphereError(Exception):
    """Root of every error this package raises on purpose."""


class Unreachable(VSphereError):
    """The vCenter (or a host behind it) does not answer: refused, timed out, no route."""


class BadCredentials(VSphereError):
    """vCenter refused the user name or password."""


class UntrustedCertificate(VSphereError):
    """The server's certificate is not the trusted one.

    `thumbprint` is the SHA-256 of the certificate actually seen ("AA:BB:..", as vSphere
    shows it), for a "trust this thumbprint?" prompt; empty when it could not be read.
    """

    def __init__(self, message: str, thumbprint: str) -> None:
        super().__init__(message)
        self.thumbprint = thumbprint


class NotFound(VSphereError):
    """A named or referenced object (VM, datastore, folder, network, file) does not exist."""


class NameTaken(VSphereError):
    """The name is held by an object Secondsite did not create; nothing was changed."""


class NotOurs(VSphereError):
    """Refused to change or remove an object that carries no Secondsite marker."""


class DatastoreFull(VSphereError):
    """The datastore has no room for what was asked."""


class TaskFailed(VSphereError):
    """A vCenter task (or call) failed for a reason without a more specific leaf.

    `fault` is the vSphere fault's type name (e.g. "InvalidState"), for the job log.
    """

    def __init__(self, message: str, fault: str = "") -> None:
        super().__init__(message)
        self.fault = fault


class TaskTimeout(TaskFailed):
    """A task did not finish in time; it may still be running on the vCenter."""
