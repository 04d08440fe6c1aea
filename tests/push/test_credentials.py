"""Logging in with a password, and installing as a user with sudo, against the real
sshd of host.py (its users: USERS, bind-mounted into sshd's mount namespace only)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from appliance.push.bundle import Bundle
from appliance.push.errors import BadCredentials, NoRoot
from appliance.push.install import Action, Step, push_install, push_uninstall
from tests.integration.configsite import Site, machine
from tests.loopfs import loop_ext4
from tests.push.host import PASSWORD, Relay, SourceHost
from tests.push.test_push import INSTALLED, Steps, kill_agent, kwargs, left_behind, trust

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.slow]


def login(kw: dict[str, object], password: str | None) -> dict[str, object]:
    """kwargs() with the password instead of the key, if there is one."""
    return kw | {"key": None, "password": password} if password is not None else kw


@pytest.mark.parametrize("user", ["root", "pushpw"])
def test_wrong_password_is_authentication_failed(  # noqa: PLR0917 - fixtures
    host: SourceHost, key: Path, bundle: Bundle, prefix: Path, tmp_path: Path, user: str
) -> None:
    fingerprint = trust(host, tmp_path / "known_hosts", key)
    kw = kwargs(host, tmp_path, key, bundle, prefix, user=user, accept_fingerprint=fingerprint)
    with pytest.raises(BadCredentials, match="authentication failed") as caught:
        push_install(host.addr, **login(kw, "not " + PASSWORD))  # type: ignore[arg-type]
    assert "password" in caught.value.hint
    assert left_behind(prefix) == []


@pytest.mark.parametrize("password", [None, PASSWORD])
def test_user_without_sudo_needs_root_or_sudo(  # noqa: PLR0917 - fixtures
    host: SourceHost, key: Path, bundle: Bundle, prefix: Path, tmp_path: Path,
    password: str | None,
) -> None:  # fmt: skip
    fingerprint = trust(host, tmp_path / "known_hosts", key)
    kw = kwargs(host, tmp_path, key, bundle, prefix, user="pushnone",
                accept_fingerprint=fingerprint)  # fmt: skip
    with pytest.raises(NoRoot, match="needs root or sudo"):
        push_install(host.addr, **login(kw, password))  # type: ignore[arg-type]
    assert left_behind(prefix) == []


@pytest.mark.parametrize(("user", "password"), [("pushsudo", None), ("pushpw", PASSWORD)])
def test_sudo_user_installs_and_uninstalls(  # noqa: PLR0917 - fixtures
    site: Site, host: SourceHost, key: Path, bundle: Bundle, prefix: Path, tmp_path: Path,
    user: str, password: str | None,
) -> None:  # fmt: skip
    """pushsudo: key login, `sudo -n`; pushpw: password login, `sudo -S` fed the same
    password (and the bundle, the config and the passphrase after it on stdin)."""
    fingerprint = trust(host, tmp_path / "known_hosts", key)
    relay = Relay(host.outside, ("127.0.0.1", site.configd.port))
    steps = Steps()
    name = f"sudo-{user}"
    try:
        with loop_ext4(tmp_path, 32) as (device, _mnt):
            kw = kwargs(host, tmp_path, key, bundle, prefix, user=user, progress=steps,
                        accept_fingerprint=fingerprint, disks=[str(device)], machine_id=name,
                        server=f"{host.outside}:{relay.port}",
                        passphrase=site.passphrase_file.read_text().strip())  # fmt: skip
            report = push_install(host.addr, **login(kw, password))  # type: ignore[arg-type]
            assert report.action is Action.INSTALLED and report.enrolled and report.started
            sudo = "sudo -S" if password else "sudo -n"
            assert (Step.PROBE, f"{user} is not root: commands run with {sudo}") in steps.seen
            site.wait(f"{name} in secondsitectl machines", lambda: machine(site, name))
            for path in INSTALLED:
                assert (prefix / path).stat().st_uid == 0, path  # made by root, through sudo
            config = (prefix / INSTALLED[1]).read_text()
            assert "[agent]" in config and PASSWORD not in config
            again = push_install(host.addr, **login(kw, password))  # type: ignore[arg-type]
            assert again.action is Action.UNCHANGED and again.facts.enrolled  # seen as root
            gone = push_uninstall(host.addr, user=user, key=None if password else key,
                                  password=password, known_hosts=tmp_path / "known_hosts",
                                  prefix=str(prefix))  # fmt: skip
            assert gone.action is Action.UNINSTALLED and gone.machine == name
            assert left_behind(prefix) == []
    finally:
        relay.close()
        kill_agent(prefix)
    assert os.geteuid() == 0
