"""A real systemd to test against: a user instance in private mount and PID namespaces.

systemd --user needs /run/systemd/system to exist (else it believes the machine was
not booted with systemd); /run is a tmpfs inside a private mount namespace only
(FIELD-NOTES: never on the host), which is also a PID namespace with its own /proc:
when the test ends, killing its first process takes systemd, the bus, journald and
every unit down. A systemd-journald runs in there too (its journal in the
namespace's /run/log/journal; with the namespace's /proc it records each line's
_SYSTEMD_UNIT), so `journalctl` run through `nsenter` reads the units' lines.
The fake role targets and daemons are in the instance's own unit directory
($XDG_CONFIG_HOME/systemd/user). A session dbus-daemon at $XDG_RUNTIME_DIR/bus is
started first; systemd joins it (through the distribution's dbus.socket user unit)
and owns org.freedesktop.systemd1 there, as the system instance does on the system
bus. `SystemdClient` is given that bus's address.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import dbus
import dbus.bus
import pytest

from appliance.setup.roles import Role

SYSTEMD = Path("/lib/systemd/systemd")
JOURNALD = Path("/lib/systemd/systemd-journald")

_SCRIPT = """
set -eu
mount -t tmpfs tmpfs /run
mount -t proc proc /proc
mkdir -p /run/systemd/system /run/log/journal
/lib/systemd/systemd-journald &
for i in $(seq 100); do [ -S /run/systemd/journal/stdout ] && break; sleep 0.05; done
dbus-daemon --session --address="unix:path=$XDG_RUNTIME_DIR/bus" --nofork --nopidfile &
for i in $(seq 100); do [ -S "$XDG_RUNTIME_DIR/bus" ] && break; sleep 0.05; done
/lib/systemd/systemd --user &  # not exec'd: systemd --user refuses to be PID 1
wait
"""

# A mount namespace for /run and /proc, a PID namespace so one kill ends everything.
UNSHARE = ["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child"]
ROLE_TARGET = """[Unit]
Description=fake {role} role
[Install]
WantedBy=default.target
Also=fake-{role}d.service
"""
ROLE_DAEMON = """[Unit]
Description=fake {role} daemon
PartOf=secondsite-{role}.target
[Service]
ExecStart=/bin/sleep infinity
[Install]
WantedBy=secondsite-{role}.target
"""


class UserSystemd:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.units = base / "config/systemd/user"
        self.runtime = base / "xdg"
        self.address = f"unix:path={self.runtime}/bus"
        self.namespace_pid = 0  # the namespace's first process, as the host sees it

    def journalctl(self) -> list[str]:
        """journalctl reading the namespace's journal."""
        return ["nsenter", "-t", str(self.namespace_pid), "-m", "--", "journalctl"]

    def add_unit(self, name: str, text: str) -> None:
        (self.units / name).write_text(text)
        connection = dbus.bus.BusConnection(self.address)
        try:
            connection.call_blocking(
                "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
                "org.freedesktop.systemd1.Manager", "Reload", "", [], timeout=30,
            )  # fmt: skip
        finally:
            connection.close()


def _wait_for_systemd(address: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"systemd --user exited with {process.returncode}")
        try:
            connection = dbus.bus.BusConnection(address)
            try:
                if connection.name_has_owner("org.freedesktop.systemd1"):
                    return
            finally:
                connection.close()
        except dbus.DBusException:
            pass
        time.sleep(0.1)
    pytest.fail("systemd --user did not appear on its bus within 20 s")


def _first_child(pid: int) -> int:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    assert children, "unshare has no child"
    return int(children[0])


def user_systemd_instance(tmp_path: Path) -> Iterator[UserSystemd]:
    needed = [SYSTEMD, JOURNALD]
    if os.geteuid() != 0 or not all(p.exists() for p in needed) or not shutil.which("unshare"):
        pytest.skip("needs root, unshare, systemd and systemd-journald")
    sd = UserSystemd(tmp_path)
    sd.units.mkdir(parents=True)
    sd.runtime.mkdir(mode=0o700)
    for role in Role:
        (sd.units / role.unit).write_text(ROLE_TARGET.format(role=role.value))
        (sd.units / f"fake-{role.value}d.service").write_text(ROLE_DAEMON.format(role=role.value))
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "XDG_RUNTIME_DIR": str(sd.runtime),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "DBUS_SESSION_BUS_ADDRESS": sd.address,
    }
    process = subprocess.Popen(
        [*UNSHARE, "bash", "-c", _SCRIPT],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "systemd.log").open("wb"),
        start_new_session=True,  # its own process group: systemd, dbus-daemon, jobs
    )
    try:
        _wait_for_systemd(sd.address, process)
        sd.namespace_pid = _first_child(process.pid)
        yield sd
    finally:
        # --kill-child: unshare's death kills the namespace's first process, and with
        # it every process in the PID namespace (systemd's services are in sessions of
        # their own, out of reach of a process-group kill).
        process.send_signal(signal.SIGKILL)
        process.wait()
