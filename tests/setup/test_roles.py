"""Roles against a real systemd (tests/setup/user_systemd.py: a user instance in a
private mount and PID namespace)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from appliance.setup.errors import Failed, InvalidArgument
from appliance.setup.roles import Roles
from appliance.setup.systemd import SystemdClient
from tests.setup.user_systemd import UserSystemd

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.timeout(120)]


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
