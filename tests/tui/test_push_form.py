"""tui.push: the install form's checks, the options sent, and how a finished job's
error is read for a first contact (the screens are in test_push.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tui.push import FormError, Target, first_contact, options, parse_target

GOOD = {"host": "src1.example.org", "user": "", "port": "", "key_file": "",
        "password": "pw", "machine": "", "disks": "/dev/sdb,/dev/sdc /dev/sdd"}  # fmt: skip
FP = "SHA256:3q2+7w9cX0mFQbqEV0vEYc3s0WnLrQ1w0ZOkzJ8m4Dc"


def form(**changes: Any) -> Target:
    return parse_target(**(GOOD | changes))


def test_defaults_and_lists() -> None:
    target = form()
    assert target == Target("src1.example.org", "root", 22, "", "src1.example.org",
                            ("/dev/sdb", "/dev/sdc", "/dev/sdd"))  # fmt: skip
    assert target.uses_password
    assert form(host=" fe80::1%eth0 ", port="2222").host == "fe80::1%eth0"
    assert form(disks=None).disks == ()  # an uninstall takes none


@pytest.mark.parametrize(
    ("changes", "said"),
    [
        ({"host": " "}, "the host is empty"),
        ({"host": "-oProxyCommand=sh"}, "is not a host name or an IP address"),
        ({"host": "a b"}, "is not a host name or an IP address"),
        ({"user": "root;id"}, "is not a user name"),
        ({"port": "0"}, "is not a TCP port"),
        ({"port": "ssh"}, "is not a TCP port"),
        ({"password": ""}, "fill in one of key file or password"),
        ({"key_file": "/root/id"}, "(not both)"),
        ({"key_file": "id", "password": ""}, "give the absolute path on this appliance"),
        ({"machine": "my machine"}, "no spaces"),
        ({"disks": " , "}, "name at least one disk"),
        ({"disks": "/dev/sdb sdc"}, "not sdc"),
    ],
)
def test_bad_values_are_said(changes: dict[str, str], said: str) -> None:
    with pytest.raises(FormError) as caught:
        form(**changes)
    assert said in str(caught.value)


def test_options_carry_one_secret_and_only_what_differs(tmp_path: Path) -> None:
    sent = options(form(machine="erp"), "pw", None, install=True)
    assert sent == {"user": "root", "machine": "erp", "password": "pw",
                    "disks": ["/dev/sdb", "/dev/sdc", "/dev/sdd"]}  # fmt: skip
    key = tmp_path / "id"
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nx\n-----END OPENSSH PRIVATE KEY-----\n")
    target = form(key_file=str(key), password="", port="2222", disks=None)
    sent = options(target, "", FP, install=False)
    assert sent == {"user": "root", "machine": "src1.example.org", "port": 2222,
                    "key": key.read_text(), "accept_fingerprint": FP}  # fmt: skip
    key.write_text("not a key")
    with pytest.raises(FormError, match="is not a private key"):
        options(target, "", None, install=False)


def test_first_contact_is_read_from_a_failed_push_job_only() -> None:
    error = (f"src1 presents the host key {FP}, not trusted yet: check it on the host "
             f"(ssh-keygen -lf), then run again with --accept-fingerprint {FP}")  # fmt: skip
    job = {"kind": "push-install", "state": "failed", "error": error}
    assert first_contact(job) == FP
    assert first_contact(job | {"kind": "push-uninstall"}) == FP
    assert first_contact(job | {"state": "running"}) is None
    assert first_contact(job | {"kind": "protect"}) is None
    changed = "HostKeyChanged: src1: host key changed: it offers ssh-ed25519 SHA256:new"
    assert first_contact(job | {"error": changed}) is None
