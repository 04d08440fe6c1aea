"""Where the process server gets a bundle (shipped, else built from a checkout, else a
clear error), and `python -m appliance.push.bundle`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from appliance.push.bundle import Bundle, Platform, bundle_for, find_bundle, main
from appliance.push.errors import BundleUnavailable

HOST = Platform("3.11", "x86_64", "2.36")


@pytest.fixture
def shipped(tmp_path: Path, bundle: Bundle) -> Path:
    out = tmp_path / "shipped"
    out.mkdir()
    shutil.copy(bundle.path, out)
    (out / "stray.tar").write_bytes(b"not a tar")  # skipped, not fatal
    return out


def test_platform_fit() -> None:
    built = Platform("3.11", "x86_64", "2.17")
    assert built.runs_on(HOST) and built.runs_on(Platform("3.11", "x86_64", "2.17"))
    assert not built.runs_on(Platform("3.11", "x86_64", "2.12"))  # older glibc
    assert not built.runs_on(Platform("3.12", "x86_64", "2.36"))
    assert not built.runs_on(Platform("3.11", "aarch64", "2.36"))


def test_shipped_bundle_first_then_a_clear_error(
    shipped: Path, bundle: Bundle, tmp_path: Path
) -> None:
    no_checkout = tmp_path / "installed"  # an installed appliance: no pyproject.toml
    no_checkout.mkdir()
    cache = tmp_path / "cache"
    found = bundle_for(HOST, cache, shipped=shipped, project=no_checkout)
    assert found.sha256 == bundle.sha256 and found.path.parent == shipped
    assert find_bundle(shipped, HOST) == found
    assert not cache.exists()  # nothing built
    for host in (Platform("3.12", "x86_64", "2.36"), Platform("3.11", "x86_64", "2.31")):
        with pytest.raises(BundleUnavailable, match=f"no agent bundle for Python {host.python}"
                           ) as caught:  # fmt: skip
            bundle_for(host, cache, shipped=shipped, project=no_checkout)
        assert str(shipped) in caught.value.message and "no source checkout" in caught.value.message
        assert "python -m appliance.push.bundle build" in caught.value.hint


def test_list_command(shipped: Path, bundle: Bundle, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", str(shipped), "--json"]) == 0
    out, err = capsys.readouterr()
    (row,) = json.loads(out)
    assert row["sha256"] == bundle.sha256 and row["python"] == "3.11"
    assert row["size"] == bundle.size and row["arch"] == "x86_64"
    assert "stray.tar is not an agent bundle" in err  # said, and skipped
    assert main(["list", str(shipped / "nope")]) == 1
    assert "is not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["build", "--out", str(shipped), "--python", "3"])
    assert usage.value.code == 2  # argparse's usage status


@pytest.mark.slow
def test_build_command_for_another_python(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "appliance.push.bundle", "build", "--out", str(tmp_path),
         "--python", "3.12", "--json"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(done.stdout)
    assert (row["python"], row["arch"], row["glibc"]) == ("3.12", "x86_64", "2.17")
    with tarfile.open(row["path"]) as tar:
        wheels = [n for n in tar.getnames() if n.startswith("wheels/")]
    assert any("cp312" in w and "zstandard" in w for w in wheels), wheels
    assert any(w.startswith("wheels/secondsite-") for w in wheels)
    assert not any("cp311-cp311" in w for w in wheels), wheels  # (abi3 wheels fit any)
    print(f"bundle py3.12: {row['size'] / (1 << 20):.1f} MiB")
