"""Roles against a real systemd: a user instance in a private mount namespace.

systemd --user needs /run/systemd/system to exist (else it believes the machine was
not booted with systemd); that directory is made on a tmpfs inside a private mount
namespace only (FIELD-NOTES: never on the host), which is also a PID namespace: when
the test ends, killing its first process takes systemd, the bus and every unit down.
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

from appliance.setup.errors import Failed, InvalidArgument
from appliance.setup.roles import Role, Roles
from appliance.setup.systemd import SystemdClient

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.timeout(120)]

SYSTEMD = Path("/lib/systemd/systemd")

_SCRIPT = """
set -eu
mount -t tmpfs tmpfs /run/systemd
mkdir -p /run/systemd/system
dbus-daemon --session --address="unix:path=$XDG_RUNTIME_DIR/bus" --nofork --nopidfile &
for i in $(seq 100); do [ -S "$XDG_RUNTIME_DIR/bus" ] && break; sleep 0.05; done
/lib/systemd/systemd --user &  # not exec'd: systemd --user refuses to be PID 1
wait
"""

# A mount namespace for /run/systemd, a PID namespace so one kill ends everything.
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


@pytest.fixture
def user_systemd(tmp_path: Path) -> Iterator[UserSystemd]:
    if os.geteuid() != 0 or not SYSTEMD.exists() or not shutil.which("unshare"):
        pytest.skip("needs root, unshare and /lib/systemd/systemd")
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
        yield sd
    finally:
        # --kill-child: unshare's death kills the namespace's first process, and with
        # it every process in the PID namespace (systemd's services are in sessions of
        # their own, out of reach of a process-group kill).
        process.send_signal(signal.SIGKILL)
        process.wait()


def wait_for(roles: Roles, expect: dict[str, tuple[bool, bool]]) -> dict[str, dict[str, object]]:
    """Start/stop jobs are asynchronous: poll until (enabled, active) match."""
    deadline = time.monotonic() + 10
    while True:
        state = roles.get()
        got = {r: (bool(s["enabled"]), bool(s["active"])) for r, s in state.items()}
        if got == expect or time.monotonic() > deadline:
            assert got == expect
            return state


def test_roles_enable_start_disable_stop(user_systemd: UserSystemd) -> None:
    client = SystemdClient(user_systemd.address)
    roles = Roles(client)
    initial = roles.get()
    assert {r: (s["enabled"], s["active"]) for r, s in initial.items()} == {
        "config": (False, False),
        "process": (False, False),
        "target": (False, False),
    }
    assert initial["config"]["unit"] == "secondsite-config.target"
    assert initial["config"]["unit_file_state"] == "disabled"

    roles.set(["config", "target"])
    wait_for(roles, {"config": (True, True), "process": (False, False), "target": (True, True)})
    wants = user_systemd.units / "default.target.wants"
    assert (wants / "secondsite-config.target").is_symlink()
    # Also= enabled the daemon and starting the target started it.
    assert client.unit_file_state("fake-configd.service") == "enabled"
    assert client.active_state("fake-configd.service") == "active"

    roles.set(["process"])
    wait_for(roles, {"config": (False, False), "process": (True, True), "target": (False, False)})
    assert not (wants / "secondsite-config.target").exists()
    assert client.active_state("fake-configd.service") == "inactive"  # PartOf= the target

    roles.set([])
    wait_for(roles, {"config": (False, False), "process": (False, False), "target": (False, False)})


def test_unknown_role_changes_nothing(user_systemd: UserSystemd) -> None:
    roles = Roles(SystemdClient(user_systemd.address))
    with pytest.raises(InvalidArgument, match="unknown role 'web'"):
        roles.set(["config", "web"])
    assert not any(s["enabled"] for s in roles.get().values())


def test_systemd_refusals_are_failed(user_systemd: UserSystemd, tmp_path: Path) -> None:
    client = SystemdClient(user_systemd.address)
    assert client.unit_file_state("nonesuch.target") == "not-found"
    assert client.active_state("nonesuch.target") == "inactive"
    client.try_restart("systemd-timesyncd.service")  # absent: left alone
    with pytest.raises(Failed, match="systemd EnableUnitFiles"):
        client.enable(["nonesuch.target"])
    with pytest.raises(Failed, match="cannot reach systemd's bus"):
        SystemdClient(f"unix:path={tmp_path}/no-bus").reload()
