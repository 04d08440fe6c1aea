"""Waiting for vCenter tasks and turning vSphere faults into this package's errors.

Everything here blocks: call it from a worker thread (`asyncio.to_thread`), never on
an event loop. A task is polled with a capped backoff rather than through a property
collector filter: tasks the jobs start take seconds, and a poll survives a pooled
connection being dropped between two calls.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import ssl
import time
from collections.abc import Iterator
from typing import Any

from pyVmomi import vim, vmodl

from appliance.vsphere.errors import (
    BadCredentials,
    DatastoreFull,
    NameTaken,
    NotFound,
    TaskFailed,
    TaskTimeout,
    Unreachable,
    UntrustedCertificate,
    VSphereError,
)

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 600.0
_FIRST_POLL = 0.05
_MAX_POLL = 2.0

# Checked in order; the first matching fault type decides the leaf.
_FAULT_MAP: tuple[tuple[type, type[VSphereError]], ...] = (
    (vim.fault.InsufficientStorageSpace, DatastoreFull),
    (vim.fault.NoDiskSpace, DatastoreFull),
    (vim.fault.DuplicateName, NameTaken),
    (vim.fault.AlreadyExists, NameTaken),
    (vim.fault.InvalidLogin, BadCredentials),
    (vim.fault.NotFound, NotFound),
    (vim.fault.FileNotFound, NotFound),
    (vmodl.fault.ManagedObjectNotFound, NotFound),
    (vim.fault.HostConnectFault, Unreachable),
    (vmodl.fault.HostCommunication, Unreachable),
)


def fault_name(fault: Any) -> str:
    """ "DuplicateName" for vim.fault.DuplicateName (what the job log shows)."""
    return type(fault).__name__.rsplit(".", 1)[-1]


def fault_message(fault: Any) -> str:
    """The fault's own text, or its type name when vCenter sent none."""
    text = getattr(fault, "msg", None) or getattr(fault, "localizedMessage", None)
    if not text:
        messages = getattr(fault, "faultMessage", None) or []
        text = "; ".join(m.message for m in messages if getattr(m, "message", None))
    return str(text or fault_name(fault))


def translate(fault: BaseException, action: str = "") -> VSphereError:
    """The package error for a vSphere fault or a transport error (not raised here)."""
    prefix = f"{action}: " if action else ""
    if isinstance(fault, VSphereError):
        return fault
    if isinstance(fault, ssl.SSLCertVerificationError):
        # A pooled reconnection met another certificate (session.py's pin check).
        seen = str(getattr(fault, "seen", ""))
        return UntrustedCertificate(f"{prefix}vCenter certificate not trusted: {fault}", seen)
    if isinstance(fault, OSError | http.client.HTTPException):
        return Unreachable(f"{prefix}vCenter connection failed: {fault}")
    name = fault_name(fault)
    message = f"{prefix}{name}: {fault_message(fault)}"
    for kind, leaf in _FAULT_MAP:
        if isinstance(fault, kind):
            return leaf(message)
    return TaskFailed(message, name)


@contextlib.contextmanager
def translated(action: str = "") -> Iterator[None]:
    """Raise this package's errors for faults and transport errors raised inside."""
    try:
        yield
    except (vmodl.MethodFault, OSError, http.client.HTTPException) as exc:
        raise translate(exc, action) from exc


def wait_for_task(task: Any, timeout: float = DEFAULT_TIMEOUT, action: str = "") -> Any:
    """Wait for `task` to finish and return its result, or raise the translated fault.

    On timeout raise TaskTimeout and leave the task alone: it may still succeed, and a
    resumed job looks for its effect (e.g. the VM by name) rather than the task.
    """
    what = action or "task"
    deadline = time.monotonic() + timeout
    delay = _FIRST_POLL
    with translated(what):
        while True:
            info = task.info
            if info.state == vim.TaskInfo.State.success:
                return info.result
            if info.state == vim.TaskInfo.State.error:
                error = info.error
                if error is None:
                    raise TaskFailed(f"{what}: failed without a fault", "")
                raise translate(error, what)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TaskTimeout(f"{what}: not finished after {timeout:.0f} s", "Timeout")
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, _MAX_POLL)
