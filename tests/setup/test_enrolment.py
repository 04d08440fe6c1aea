"""Register enrols: a real configd, setupd's core storing the registration, and the
process-server and master-target daemons run by a real systemd as their units run
them (ConditionPathExists= on the enrolled certificate, Type=notify) -> enrolled and
listed by the configuration server."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance.lab.bus import PrivateBus
from appliance.setup.core import SetupCore
from appliance.setup.enrolment import Enroller, RoleDaemon, transient_properties
from appliance.setup.errors import Failed
from appliance.setup.hostname import Hostname
from appliance.setup.journal import Journal
from appliance.setup.network import Network, NetworkdFiles
from appliance.setup.registration import Registration
from appliance.setup.roles import Role, Roles
from appliance.setup.services import Services
from appliance.setup.systemd import SystemdClient
from appliance.setup.time import Ntp
from tests.conftest import TlsMaterial
from tests.integration.configsite import Site, start_site
from tests.integration.daemons import RoleDaemon as Daemon
from tests.setup.user_systemd import UserSystemd

pytestmark = [
    pytest.mark.integration, pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(300),
]  # fmt: skip

ROLE_TARGET = """[Unit]
Description={role} role
[Install]
WantedBy=default.target
Also={unit}
"""
# As units/secondsite-{processd,targetd}.service start their daemon, minus the
# sandbox and the user (this systemd is root's user instance).
ROLE_DAEMON = """[Unit]
PartOf=secondsite-{role}.target
ConditionPathExists={state}/tls/{role}.crt
[Service]
Type=notify
NotifyAccess=main
ExecStart={python} -m {module} --config {config}
[Install]
WantedBy=secondsite-{role}.target
"""


@pytest.fixture
def site(
    tmp_path: Path, private_bus_factory: Callable[..., PrivateBus], tls: TlsMaterial
) -> Iterator[Site]:
    yield from start_site(tmp_path, private_bus_factory, tls)


def install(sd: UserSystemd, site: Site) -> dict[Role, RoleDaemon]:
    daemons: dict[Role, RoleDaemon] = {}
    for role, name, module in [
        (Role.PROCESS, "ps1", "appliance.process"),
        (Role.TARGET, "mt1", "appliance.target"),
    ]:
        daemon: Daemon = site.role(name, module)
        unit = f"secondsite-{role.value}d.service"
        command = (sys.executable, "-m", module, "--config", str(daemon.config))
        sd.add_unit(unit, ROLE_DAEMON.format(
            role=role.value, state=daemon.state_dir, python=sys.executable, module=module,
            config=daemon.config,
        ))  # fmt: skip
        sd.add_unit(role.unit, ROLE_TARGET.format(role=role.value, unit=unit))
        daemons[role] = RoleDaemon(command, unit, user=None)  # root's user instance
    return daemons


def setup_core(tmp_path: Path, sd: UserSystemd, daemons: dict[Role, RoleDaemon]) -> SetupCore:
    systemd = SystemdClient(sd.address)
    registration = Registration(tmp_path / "registration")
    (tmp_path / "root/etc").mkdir(parents=True)
    return SetupCore(
        Network(lambda: None, NetworkdFiles(tmp_path / "network")),
        Hostname(tmp_path / "root", lambda _: None, lambda: "localhost"),
        Ntp(tmp_path / "timesyncd"),
        registration,
        Roles(systemd),
        services=Services(systemd, Journal(sd.journalctl())),
        enroller=Enroller(registration, systemd, daemons),
    )


def test_register_enrols_and_starts_the_role_daemons(
    tmp_path: Path, user_systemd: UserSystemd, site: Site
) -> None:
    daemons = install(user_systemd, site)
    core = setup_core(tmp_path, user_systemd, daemons)
    units = SystemdClient(user_systemd.address)
    asyncio.run(core.set_roles(["process", "target"]))
    # Not enrolled: the role targets run, their daemons are skipped by the condition.
    for role in (Role.PROCESS, Role.TARGET):
        assert units.unit_status(daemons[role].unit)["active_state"] == "inactive"
    server = f"127.0.0.1:{site.configd.port}"

    with pytest.raises(Failed) as refused:
        asyncio.run(core.register(server, "not the passphrase"))
    message = refused.value.message
    assert message.startswith(f"registered with {server}, but not every role enrolled: ")
    # The daemon's own words, from the enrolment service's standard error.
    for name in ("process", "target"):
        assert (
            f"{name}: enrolment failed: secondsite-{name}d: error: enrolment refused: "
            "wrong enrolment passphrase"
        ) in message
    assert site.ctl_json("servers") == []

    passphrase = site.passphrase_file.read_text().strip()
    result = asyncio.run(core.register(server, passphrase))
    assert result["config_server"] == server
    assert result["roles"] == {
        role.value: {
            "unit": daemons[role].unit, "enrolled": True,
            "note": f"enrolled with {server}; {daemons[role].unit} started",
        }
        for role in (Role.PROCESS, Role.TARGET)
    }  # fmt: skip
    for role in (Role.PROCESS, Role.TARGET):
        assert units.unit_status(daemons[role].unit)["active_state"] == "active"

    def reporting() -> dict[str, str]:
        servers = site.ctl_json("servers")
        return {s["name"]: s["role"] for s in servers if s["connected"]}

    # Listed and connected: the daemons systemd started report with what they enrolled.
    assert site.wait("both daemons reporting", lambda: len(reporting()) == 2)
    assert reporting() == {"ps1": "process", "mt1": "target"}

    # Again (a retry from the console): nothing to enrol, the units are running.
    again = asyncio.run(core.enrol())
    assert again["process"]["note"] == "already enrolled; secondsite-processd.service started"


def test_enrol_without_registration_is_refused(tmp_path: Path, user_systemd: UserSystemd) -> None:
    core = setup_core(tmp_path, user_systemd, {})
    with pytest.raises(Failed, match="no configuration server registered: Register first"):
        asyncio.run(core.enrol())


def test_the_appliances_enrolment_service_runs_as_the_daemons_user() -> None:
    """What the user instance above cannot show: User=, Group= and StateDirectory=."""
    daemon = RoleDaemon(("/opt/secondsite/bin/secondsite-processd",), "secondsite-processd.service")
    argv = [*daemon.command, "--enroll", "cs:9440", "--passphrase-file", "/dev/stdin"]
    props = dict(
        transient_properties(
            daemon, argv, Path("/var/lib/secondsite/process"), b"s3cret", Path("/x/err")
        )
    )
    assert (props["User"], props["Group"]) == ("secondsite", "secondsite")
    assert list(props["StateDirectory"]) == ["secondsite/process"]
    assert bytes(props["StandardInputData"]) == b"s3cret\n"
    assert props["ExecStart"][0][1] == argv and props["Type"] == "oneshot"
    elsewhere = dict(transient_properties(daemon, argv, Path("/srv/ps"), b"s", Path("/x/err")))
    assert "StateDirectory" not in elsewhere  # not under /var/lib: left as it is
