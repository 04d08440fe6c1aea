"""The push engine's pure parts: ssh failure mapping, fingerprints, probe parsing."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

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
from appliance.push.ssh import Target, ssh_error
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
