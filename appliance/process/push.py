"""The process server's push_install / push_uninstall control RPCs (see appliance.push).

Only the configuration server (or an admin tool) may ask: the call carries a private
key and makes this server run commands on another host. The key's text is written to
a 0600 temp file for the run and deleted in a `finally`; it is never stored. The known
hosts (trust on first use) persist in STATE/push_known_hosts, the bundles are built
into (or found in) STATE/bundles. Blocking: the caller runs `call` in a thread.

    params (push_install): host, port, user, key (text), server (HOST:PORT the host
    enrols with), passphrase, disks, machine_id, accept_fingerprint, and for tests
    only prefix, start_without_systemd. push_uninstall: host, port, user, key, prefix.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from appliance.push.bundle import build_bundle
from appliance.push.install import InstallReport, Step, push_install, push_uninstall
from appliance.wire.errors import InvalidRequest

log = logging.getLogger(__name__)

METHODS = frozenset({"push_install", "push_uninstall"})
#: Certificate kinds (their OU) that may call METHODS.
CALLERS = frozenset({"config", "admin"})
KNOWN_HOSTS = "push_known_hosts"
BUNDLES = "bundles"


def call(method: str, params: dict[str, Any], state_dir: Path) -> dict[str, Any]:
    """Run one push RPC to the end; PushError leaves propagate (ok=false answers)."""
    host = _text(params, "host")
    common: dict[str, Any] = {
        "user": _text(params, "user", "root"),
        "known_hosts": state_dir / KNOWN_HOSTS,
        "prefix": _text(params, "prefix", ""),
        "port": _port(params.get("port", 22)),
        "progress": functools.partial(_log_step, host),
    }
    with _key_file(_text(params, "key")) as key:
        report: InstallReport
        if method == "push_uninstall":
            report = push_uninstall(host, key=key, **common)
        else:
            disks = params.get("disks", [])
            if not isinstance(disks, list) or not all(isinstance(d, str) for d in disks):
                raise InvalidRequest("disks must be a list of device paths")
            report = push_install(
                host, key=key, server=_text(params, "server"),
                passphrase=_text(params, "passphrase"),
                bundle=functools.partial(build_bundle, state_dir / BUNDLES), disks=disks,
                machine_id=params.get("machine_id") or None,
                accept_fingerprint=params.get("accept_fingerprint") or None,
                start_without_systemd=bool(params.get("start_without_systemd", False)),
                **common,
            )  # fmt: skip
    return dataclasses.asdict(report)


def _log_step(host: str, step: Step, message: str) -> None:
    log.info("push %s: %s: %s", host, step, message)


@contextmanager
def _key_file(text: str) -> Iterator[Path]:
    fd, name = tempfile.mkstemp(prefix="push-key.")  # mode 0600
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text if text.endswith("\n") else text + "\n")  # ssh wants the newline
        yield Path(name)
    finally:
        os.unlink(name)


def _text(params: dict[str, Any], key: str, default: str | None = None) -> str:
    value = params.get(key, default)
    if not isinstance(value, str) or (default is None and not value):
        raise InvalidRequest(f"{key} must be a non-empty string")
    return value


def _port(value: object) -> int:
    if not isinstance(value, int) or not 0 < value < 65536:
        raise InvalidRequest("port must be an integer from 1 to 65535")
    return value
