"""The push engine's pure parts: ssh failure mapping, fingerprints, probe parsing."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from appliance.push import askpass, hostkeys
from appliance.push.errors import (
    BadCredentials,
    DiskFull,
    HostKeyChanged,
    NoRoot,
    PushError,
    UnknownHostKey,
    Unreachable,
    Unsupported,
)
from appliance.push.hostkeys import fingerprint, forget, known_keys
from appliance.push.probe import HostFacts, check
from appliance.push.ssh import Ssh, Sudo, Target, ssh_error
from tests.push.host import keypair

TARGET = Target("10.0.0.2", Path("/k"), Path("/kh"))

SSH_MESSAGES = {
    "ssh: connect to host 10.0.0.2 port 22: Connection refused": Unreachable,
    "ssh: connect to host 10.0.0.2 port 22: Connection timed out": Unreachable,
    "root@10.0.0.2: Permission denied (publickey).": BadCredentials,
    "@@@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @@@\nHost key verification "
    "failed.": HostKeyChanged,
    "No ED25519 host key is known for 10.0.0.2 and you have requested strict checking.\n"
    "Host key verification failed.": UnknownHostKey,
}


@pytest.mark.parametrize("stderr", sorted(SSH_MESSAGES))
def test_ssh_failures_map_to_leaves(stderr: str) -> None:
    error = ssh_error(TARGET, stderr)
    assert type(error) is SSH_MESSAGES[stderr]
    assert isinstance(error, PushError) and error.message


def test_fingerprint_matches_ssh_keygen(tmp_path: Path) -> None:
    key = keypair(tmp_path / "k")
    kind, blob = key.with_suffix(".pub").read_text().split()[:2]
    listed = subprocess.run(["ssh-keygen", "-l", "-f", str(key.with_suffix(".pub"))],
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert fingerprint(blob) == listed.split()[1]
    known = tmp_path / "known_hosts"
    known.write_text(f"[h]:2222 {kind} {blob}\nother {kind} {blob}\n")
    assert known_keys(known, "[h]:2222") == [(kind, blob)]
    forget(known, "[h]:2222")
    assert known_keys(known, "[h]:2222") == [] and known_keys(known, "other")


PROBE = """os=Debian GNU/Linux 12 (bookworm)
kernel=Linux
arch=x86_64
python=Python 3.11.2
glibc=glibc 2.36
uid=0
sudo=no
systemd=yes
tracefs=no
free_opt=1048576
free_var=1048576
installed=
enrolled=no
config=no
state=no
"""


def facts(**changes: str) -> HostFacts:
    text = PROBE
    for k, v in changes.items():
        text = "\n".join(f"{k}={v}" if line.startswith(f"{k}=") else line
                         for line in text.splitlines())  # fmt: skip
    return HostFacts.parse(text)


def test_probe_parses_and_checks() -> None:
    f = facts()
    assert f.python_version == (3, 11) and f.glibc == "2.36" and f.free_opt == 1 << 30
    assert f.platform.tag == "py3.11-x86_64-glibc2.36"
    assert check(f, "h", 10 << 20) == [
        "no tracefs in this kernel: the agent will track changes by scanning"
    ]


@pytest.mark.parametrize(
    ("changes", "error", "text"),
    [
        ({"python": "Python 3.8.10"}, Unsupported, "3.8 is too old"),
        ({"python": "sh: 1: python3: not found"}, Unsupported, "no usable python3"),
        ({"arch": "riscv64"}, Unsupported, "riscv64"),
        ({"glibc": ""}, Unsupported, "glibc"),
        ({"uid": "1000"}, NoRoot, "sudo"),
        ({"free_opt": "1024"}, DiskFull, "/opt"),
    ],
)
def test_probe_refusals(changes: dict[str, str], error: type[PushError], text: str) -> None:
    with pytest.raises(error, match=text):
        check(facts(**changes), "h", 10 << 20)
    if "uid" in changes:
        assert check(facts(uid="1000", sudo="yes"), "h", 10 << 20)


def test_askpass_helper_prints_the_secret_from_its_environment() -> None:
    secret = 'it\'s a "$secret" \\n with `quotes`'
    helper = askpass.helper()
    assert helper.stat().st_mode & 0o777 == 0o700 and secret not in helper.read_text()
    done = subprocess.run([str(helper), "Password:"], capture_output=True, text=True,
                          env={askpass.SECRET_ENV: secret}, check=True)  # fmt: skip
    assert done.stdout == secret + "\n"
    helper.unlink()  # removed (tmpfiles cleaning): written again
    assert askpass.helper().is_file()


def test_password_login_options_and_environment() -> None:
    target = Target("h", None, Path("/kh"), "admin", password="pw")
    assert "pw" not in repr(target) and str(target) == "admin@h"
    ssh = Ssh(target, sudo=Sudo.PASSWORD)
    args = " ".join(ssh.args())
    assert "BatchMode=no" in args and "PubkeyAuthentication=no" in args
    assert "NumberOfPasswordPrompts=1" in args and "IdentityFile" not in args
    assert "pw" not in " ".join(ssh.command("true"))
    assert ssh.command("true")[-1].startswith("sudo -S -k -p '' env ")
    env = ssh.env()
    assert env[askpass.SECRET_ENV] == "pw" and env["SSH_ASKPASS_REQUIRE"] == "force"
    keyed = Ssh(Target("h", Path("/k"), Path("/kh")))
    assert askpass.SECRET_ENV not in keyed.env() and "BatchMode=yes" in " ".join(keyed.args())
    with pytest.raises(ValueError, match="password"):
        Ssh(Target("h", Path("/k"), Path("/kh")), sudo=Sudo.PASSWORD)


def test_no_openssh_client_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")  # a process server without openssh-client
    with pytest.raises(PushError, match="ssh-keyscan is not installed") as caught:
        hostkeys.verify(TARGET)
    assert "openssh-client" in caught.value.hint
    with pytest.raises(PushError, match="ssh is not installed"):
        Ssh(TARGET).run("true")
