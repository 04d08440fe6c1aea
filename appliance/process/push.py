"""The process server's push_install / push_uninstall / push_status control RPCs (see
appliance.push).

Only the configuration server (or an admin tool) may ask: the call carries a private
key or a password and makes this server run commands on another host. A key's text is
written to a 0600 temp file for the run and deleted in a `finally`; a password stays
in memory (the ssh client's environment, see appliance.push.ssh). Neither is stored
or logged. The known hosts (trust on first use) persist in STATE/push_known_hosts;
bundles come from the image's directory, else are built into STATE/bundles
(appliance.push.bundle.bundle_for). Blocking: the caller runs `call` in a thread.

Progress: install and uninstall record each engine step under the caller's `run` id;
`push_status` returns them while the run goes on (and for a while after). The
configuration server's job step polls it: the install RPC itself answers only once,
at the end, and a poll on a second connection needs no change to the wire protocol.

    params (push_install): host, port, user, key (text) or password, server (HOST:PORT
    the host enrols with), passphrase, disks, machine_id, accept_fingerprint, run, and
    for tests only prefix, start_without_systemd. push_uninstall: host, port, user,
    key or password, accept_fingerprint, run, prefix. push_status: run.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from appliance.push.bundle import bundle_for
from appliance.push.install import InstallReport, Step, push_install, push_uninstall
from appliance.wire.errors import InvalidRequest

log = logging.getLogger(__name__)

METHODS = frozenset({"push_install", "push_uninstall", "push_status"})
#: Certificate kinds (their OU) that may call METHODS.
CALLERS = frozenset({"config", "admin"})
KNOWN_HOSTS = "push_known_hosts"
BUNDLES = "bundles"
KEPT_RUNS = 64  # finished runs whose steps push_status still answers


class _Runs:
    """Steps of recent runs, by run id (memory only: a restart loses them, and the run)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def start(self, run: str) -> None:
        with self._lock:
            self._runs[run] = {"run": run, "running": True, "steps": []}
            self._runs.move_to_end(run)
            while len(self._runs) > KEPT_RUNS:
                self._runs.popitem(last=False)

    def step(self, run: str, host: str, step: Step, message: str) -> None:
        log.info("push %s: %s: %s", host, step, message)
        with self._lock:
            if run in self._runs:
                self._runs[run]["steps"].append(
                    {"step": str(step), "message": message, "at": time.time()}
                )

    def finish(self, run: str) -> None:
        with self._lock:
            if run in self._runs:
                self._runs[run]["running"] = False

    def status(self, run: str) -> dict[str, Any]:
        with self._lock:
            found = self._runs.get(run)
            if found is None:
                return {"run": run, "known": False, "running": False, "steps": []}
            return {**found, "known": True, "steps": list(found["steps"])}


RUNS = _Runs()


def call(method: str, params: dict[str, Any], state_dir: Path) -> dict[str, Any]:
    """Run one push RPC to the end; PushError leaves propagate (ok=false answers)."""
    if method == "push_status":
        return RUNS.status(_text(params, "run"))
    host = _text(params, "host")
    run = _text(params, "run", host)
    common: dict[str, Any] = {
        "user": _text(params, "user", "root"),
        "known_hosts": state_dir / KNOWN_HOSTS,
        "prefix": _text(params, "prefix", ""),
        "port": _port(params.get("port", 22)),
        "progress": functools.partial(RUNS.step, run, host),
        "accept_fingerprint": params.get("accept_fingerprint") or None,
    }
    password = params.get("password") or None
    if password is not None and not isinstance(password, str):
        raise InvalidRequest("password must be a string")
    if (password is None) == (not params.get("key")):
        raise InvalidRequest("give either key or password")
    RUNS.start(run)
    try:
        with _key_file(params.get("key")) as key:
            report: InstallReport
            if method == "push_uninstall":
                report = push_uninstall(host, key=key, password=password, **common)
            else:
                report = _install(host, params, state_dir, key, password, common)
    finally:
        RUNS.finish(run)
    return dataclasses.asdict(report)


def _install(  # noqa: PLR0917 - call()'s pieces
    host: str,
    params: dict[str, Any],
    state_dir: Path,
    key: Path | None,
    password: str | None,
    common: dict[str, Any],
) -> InstallReport:
    disks = params.get("disks", [])
    if not isinstance(disks, list) or not all(isinstance(d, str) for d in disks):
        raise InvalidRequest("disks must be a list of device paths")
    return push_install(
        host, key=key, password=password, server=_text(params, "server"),
        passphrase=_text(params, "passphrase"),
        bundle=functools.partial(bundle_for, cache_dir=state_dir / BUNDLES), disks=disks,
        machine_id=params.get("machine_id") or None,
        start_without_systemd=bool(params.get("start_without_systemd", False)),
        **common,
    )  # fmt: skip


@contextmanager
def _key_file(text: object) -> Iterator[Path | None]:
    if not text:
        yield None
        return
    if not isinstance(text, str):
        raise InvalidRequest("key must be the private key's text")
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
