"""The OVF ISO transport: ovf-env.xml found on ISO 9660 volumes that genisoimage writes
the ways vSphere and other tools do (plain ISO 9660, Rock Ridge, Joliet), read from the
image file exactly as from /dev/sr0, and applied by `secondsite-firstboot`."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.setup import ovfenv, ovfiso
from appliance.setup.firstboot import DONE
from tests.setup.ovfdoc import environment


def make_iso(tmp: Path, files: dict[str, str], *flags: str) -> Path:
    """An ISO 9660 image of `files` (name -> text), written by genisoimage."""
    program = shutil.which("genisoimage")
    if program is None:
        pytest.fail("genisoimage not found: it is in the Makefile's APT_PACKAGES")
    content = tmp / "content"
    content.mkdir(exist_ok=True)
    for name, text in files.items():
        (content / name).write_text(text)
    iso = tmp / "env.iso"
    done = subprocess.run(
        [program, "-quiet", "-V", "OVF ENV", *flags, "-o", str(iso), str(content)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return iso


# Plain ISO 9660 stores OVF_ENV.XML;1; Rock Ridge and Joliet keep the real name.
@pytest.mark.parametrize("flags", [(), ("-r",), ("-J",), ("-r", "-J")], ids=str)
def test_reads_ovf_env_from_every_iso_flavour(tmp_path: Path, flags: tuple[str, ...]) -> None:
    text = environment({"hostname": "dr01.example.com", "role": "target"})
    iso = make_iso(tmp_path, {"ovf-env.xml": text, "readme.txt": "other file\n"}, *flags)
    assert ovfiso.read_environment(iso) == text
    settings = ovfenv.parse(ovfiso.read_environment(iso) or "")
    assert settings.hostname == "dr01.example.com"


def test_a_large_environment_spans_sectors(tmp_path: Path) -> None:
    many = {f"x{i}": "v" * 100 for i in range(100)}  # ~15 KiB: several 2 KiB sectors
    text = environment({"hostname": "dr01", **many})
    iso = make_iso(tmp_path, {"ovf-env.xml": text}, "-r", "-J")
    assert ovfiso.read_environment(iso) == text


def test_a_disc_without_the_file(tmp_path: Path) -> None:
    iso = make_iso(tmp_path, {"ovf-env.txt": "no\n", "env.xml": "no\n"}, "-r")
    assert ovfiso.read_environment(iso) is None
    assert ovfiso.find_environment([iso]) is None


def test_not_iso9660(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "appliance.setup.ovfiso")
    junk = tmp_path / "disk.img"
    junk.write_bytes(bytes(64 * 1024))
    with pytest.raises(ovfiso.IsoError, match="not an ISO 9660 volume"):
        ovfiso.read_environment(junk)
    short = tmp_path / "short.img"
    short.write_bytes(b"CD001")
    with pytest.raises(ovfiso.IsoError, match="truncated volume"):
        ovfiso.read_environment(short)
    # find_environment logs such a medium and goes on to the next drive.
    good = make_iso(tmp_path, {"ovf-env.xml": environment({"role": "all"})}, "-J")
    assert ovfiso.find_environment([junk, tmp_path / "sr1", good]) == (
        good,
        environment({"role": "all"}),
    )
    assert "not an ISO 9660 volume" in caplog.text and "no medium" in caplog.text


def test_cdrom_devices_from_sysfs(tmp_path: Path) -> None:
    for name in ("sda", "sr10", "sr1", "sr0", "loop0"):
        (tmp_path / name).mkdir()
    assert ovfiso.cdrom_devices(tmp_path) == [Path("/dev/sr0"), Path("/dev/sr1"),
                                              Path("/dev/sr10")]  # fmt: skip
    assert ovfiso.cdrom_devices(tmp_path / "missing") == []


def test_firstboot_reads_the_cdrom(tmp_path: Path) -> None:
    """The program end to end: the ISO's environment is parsed and the marker written
    (role "console" and no other property: nothing to apply, nothing privileged)."""
    iso = make_iso(tmp_path, {"ovf-env.xml": environment({"role": "console"})}, "-r")
    root = tmp_path / "root"
    done = subprocess.run(
        [sys.executable, "-m", "appliance.setup.firstboot", "--root", str(root),
         "--source", "cdrom", "--cdrom", str(tmp_path / "sr0"), "--cdrom", str(iso),
         "--systemd-bus", "none"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"OVF environment read from ovf-env.xml on {iso}" in done.stderr
    assert (root / DONE).read_text() == "applied: nothing\n"


@pytest.mark.root
def test_firstboot_applies_the_hostname_from_the_cdrom(tmp_path: Path) -> None:
    if not shutil.which("unshare"):
        pytest.skip("needs unshare(1) for a private UTS namespace")
    iso = make_iso(tmp_path, {"ovf-env.xml": environment({"hostname": "DR02.example.com"})})
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    done = subprocess.run(
        ["unshare", "--uts", sys.executable, "-m", "appliance.setup.firstboot",
         "--root", str(root), "--source", "cdrom", "--cdrom", str(iso),
         "--systemd-bus", "none"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (root / "etc/hostname").read_text() == "dr02.example.com\n"
    assert (root / DONE).read_text() == "applied: hostname\n"
