"""Hostname, NTP drop-in and registration: the files they leave, under a temporary root."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.setup.errors import InvalidArgument
from appliance.setup.hostname import Hostname
from appliance.setup.registration import Registration
from appliance.setup.time import Ntp

REPO = Path(__file__).resolve().parents[2]


def test_hostname_file_and_kernel_call(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    calls: list[str] = []
    hostname = Hostname(tmp_path, calls.append, lambda: "transient")
    assert hostname.get() == "transient"
    assert hostname.set("DR01.example.com") == "dr01.example.com"
    assert (tmp_path / "etc/hostname").read_text() == "dr01.example.com\n"
    assert calls == ["dr01.example.com"]
    assert hostname.get() == "dr01.example.com"
    with pytest.raises(InvalidArgument):
        hostname.set("bad_name")
    assert calls == ["dr01.example.com"]


@pytest.mark.root
@pytest.mark.integration
def test_sethostname_for_real_in_a_uts_namespace(tmp_path: Path) -> None:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare")
    (tmp_path / "etc").mkdir()
    code = (
        "import socket, sys; from pathlib import Path;"
        "from appliance.setup.hostname import Hostname;"
        "Hostname(Path(sys.argv[1])).set('dr-uts-test'); print(socket.gethostname())"
    )
    done = subprocess.run(
        ["unshare", "--uts", sys.executable, "-c", code, str(tmp_path)],
        capture_output=True, text=True, timeout=30, check=False, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "dr-uts-test"
    assert (tmp_path / "etc/hostname").read_text() == "dr-uts-test\n"


def test_ntp_dropin_written_and_removed(tmp_path: Path) -> None:
    restarted: list[str] = []
    ntp = Ntp(tmp_path / "timesyncd.conf.d", restarted.append)
    assert ntp.get() == []
    assert ntp.set(["pool.ntp.org", "192.0.2.123", "pool.ntp.org"]) == [
        "pool.ntp.org",
        "192.0.2.123",
    ]
    text = ntp.path.read_text()
    assert "[Time]\nNTP=pool.ntp.org 192.0.2.123\n" in text
    assert ntp.get() == ["pool.ntp.org", "192.0.2.123"]
    assert ntp.set([]) == [] and not ntp.path.exists()
    assert restarted == ["systemd-timesyncd.service"] * 2
    with pytest.raises(InvalidArgument):
        ntp.set(["ok.example", "bad server"])
    assert not ntp.path.exists() and len(restarted) == 2


def test_registration_is_root_only(tmp_path: Path) -> None:
    reg = Registration(tmp_path / "setup")
    assert reg.address() == ""
    assert reg.register("[2001:db8::5]", " correct horse \n") == "[2001:db8::5]:9440"
    assert reg.address() == "[2001:db8::5]:9440"
    assert reg.passphrase_path.read_text() == "correct horse\n"
    assert stat.S_IMODE((tmp_path / "setup").stat().st_mode) == 0o700
    for name in ("passphrase", "config-server"):
        assert stat.S_IMODE((tmp_path / "setup" / name).stat().st_mode) == 0o600
    with pytest.raises(InvalidArgument):
        reg.register("config:9440", "")
