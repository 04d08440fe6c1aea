"""Registration that enrols: the process-server and master-target daemons of this
appliance enrol with the registered configuration server, then their units start.

Enrolling is the daemon's own `--enroll HOST:PORT --passphrase-file FILE`, with the
daemon's configuration (so its name, advertised address and state directory are the
ones it will run with). It runs as a transient systemd service (StartTransientUnit),
not as a child of setupd: setupd's sandbox has no IP access and cannot write the
daemons' state, while the transient service runs as the daemon's user with its
StateDirectory= — what it writes has the right owner. The passphrase, root-only on
disk, reaches it on standard input (StandardInputData=; `--passphrase-file
/dev/stdin`: credentials would be the tidier way, but they do not reach a service of
the test's user manager); its standard error goes to a file in setupd's root-only
state directory, whose last line is the reason when it fails. The role unit's
ConditionPathExists= on the certificate is then met, and the unit is started. A
daemon that already enrolled (its unit starts) is left alone.
"""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import dbus

from appliance.setup.errors import Failed
from appliance.setup.registration import Registration
from appliance.setup.roles import Role

_log = logging.getLogger(__name__)

TIMEOUT = 60.0  # --check-config
BIN = Path("/opt/secondsite/bin")
STATE_ROOT = Path("/var/lib")


@dataclass(frozen=True)
class RoleDaemon:
    """How to run one role's daemon (`command`, without --enroll), its unit, and the
    user it runs as (None: the manager's own user, as in a test's user instance)."""

    command: tuple[str, ...]
    unit: str
    user: str | None = "secondsite"


DAEMONS: Mapping[Role, RoleDaemon] = {
    Role.PROCESS: RoleDaemon((str(BIN / "secondsite-processd"),), "secondsite-processd.service"),
    Role.TARGET: RoleDaemon((str(BIN / "secondsite-targetd"),), "secondsite-targetd.service"),
}


class UnitRunner(Protocol):
    def run_job(self, method: str, unit: str) -> dict[str, str]: ...
    def run_transient(self, name: str, properties: list[tuple[str, Any]]) -> dict[str, str]: ...


def _check_config(command: Sequence[str]) -> dict[str, Any]:
    try:
        done = subprocess.run(
            [*command, "--check-config"], capture_output=True, text=True, errors="replace",
            timeout=TIMEOUT, check=False, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except FileNotFoundError:
        raise Failed(f"{command[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise Failed(f"{command[0]} --check-config did not finish in {TIMEOUT:.0f} s") from None
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise Failed(f"its configuration: {lines[-1] if lines else done.returncode}")
    try:
        config = json.loads(done.stdout)
        return config if isinstance(config, dict) else {}
    except ValueError:
        raise Failed(f"{command[0]} --check-config did not print JSON") from None


def transient_properties(
    daemon: RoleDaemon, argv: list[str], state_dir: Path, passphrase: bytes, errors: Path
) -> list[tuple[str, Any]]:
    """The enrolment service: oneshot, as the daemon's user, its state directory."""
    exec_start = (argv[0], dbus.Array(argv, signature="s"), False)
    props: list[tuple[str, Any]] = [
        ("Description", dbus.String(f"Secondsite: enrol {daemon.unit}")),
        ("Type", dbus.String("oneshot")),
        ("ExecStart", dbus.Array([exec_start], signature="(sasb)")),
        # On standard input (StandardInput=data): never in a file the user can read.
        ("StandardInputData", dbus.ByteArray(passphrase + b"\n")),
        ("StandardErrorFileToTruncate", dbus.String(str(errors))),
    ]
    if daemon.user is not None:
        props += [("User", dbus.String(daemon.user)), ("Group", dbus.String(daemon.user))]
        if state_dir.is_relative_to(STATE_ROOT):
            relative = str(state_dir.relative_to(STATE_ROOT))
            props.append(("StateDirectory", dbus.Array([relative], signature="s")))
            props.append(("StateDirectoryMode", dbus.UInt32(0o750)))  # as the role units
    return props


class Enroller:
    def __init__(
        self,
        registration: Registration,
        units: UnitRunner | None,
        daemons: Mapping[Role, RoleDaemon] = DAEMONS,
    ) -> None:
        self._registration = registration
        self._units = units
        self._daemons = daemons

    def enrol(self, roles: Sequence[Role]) -> dict[str, dict[str, Any]]:
        """Enrol each role's daemon that has not yet, then start its unit.

        role -> {unit, enrolled (b), note}. Failed names every role that could not
        enrol and why (the registration itself stays: Register again retries).
        """
        address = self._registration.address()
        if not address:
            raise Failed("no configuration server registered: Register first")
        out: dict[str, dict[str, Any]] = {}
        problems: list[str] = []
        for role in roles:
            daemon = self._daemons.get(role)
            if daemon is None:
                continue  # the configuration server does not enrol with itself
            try:
                out[role.value] = self._enrol_one(role, daemon, address)
            except Failed as exc:
                problems.append(f"{role.value}: {exc.message}")
        if problems:
            raise Failed(
                f"registered with {address}, but not every role enrolled: " + "; ".join(problems)
            )
        return out

    def _units_or_fail(self) -> UnitRunner:
        if self._units is None:
            raise Failed("enrolment runs through systemd, and setupd runs without its bus")
        return self._units

    def _enrol_one(self, role: Role, daemon: RoleDaemon, address: str) -> dict[str, Any]:
        # The unit itself tells whether the daemon enrolled: its ConditionPathExists= on
        # the certificate (checked by systemd, as root: setupd cannot read the daemon's
        # state directory) lets it start only then.
        units = self._units_or_fail()
        state = units.run_job("StartUnit", daemon.unit)
        note = "already enrolled"
        if state["active_state"] == "inactive":
            state_dir = Path(str(_check_config(daemon.command).get("state_dir", "")))
            if not state_dir.is_absolute():
                raise Failed(f"the {role.value} daemon's --check-config names no state_dir")
            self._run_enrolment(role, daemon, address, state_dir)
            note = f"enrolled with {address}"
            _log.info("%s daemon %s", role.value, note)
            state = units.run_job("StartUnit", daemon.unit)
        if state["active_state"] not in ("active", "reloading"):
            result = f", result {state['result']}" if state.get("result") else ""
            raise Failed(
                f"{daemon.unit} is {state['active_state']} ({state['sub_state']}{result}); "
                "its journal says why"
            )
        return {"unit": daemon.unit, "enrolled": True, "note": f"{note}; {daemon.unit} started"}

    def _run_enrolment(self, role: Role, daemon: RoleDaemon, address: str, state: Path) -> None:
        passphrase = self._registration.passphrase_path.read_bytes().strip()
        errors = self._registration.directory / f"enrol-{role.value}.log"
        argv = [*daemon.command, "--enroll", address, "--passphrase-file", "/dev/stdin"]
        name = f"secondsite-enrol-{role.value}.service"
        props = transient_properties(daemon, argv, state, passphrase, errors)
        status = self._units_or_fail().run_transient(name, props)
        if status["active_state"] == "failed":
            try:
                lines = errors.read_text(errors="replace").strip().splitlines()
            except OSError:
                lines = []
            reason = lines[-1] if lines else f"result {status['result']}"
            raise Failed(f"enrolment failed: {reason}")
