"""secondsitectl push-install end to end: configd places the job on an enrolled processd,
which installs the agent over SSH on a real sshd in a network namespace (host.py); the
agent enrols and is listed. The key is gone from the job once the install ran."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance.lab.bus import PrivateBus
from appliance.process.push import BUNDLES
from appliance.push.bundle import Bundle
from tests.conftest import TlsMaterial
from tests.integration.configsite import Site, machine, start_site
from tests.loopfs import loop_ext4
from tests.push.host import Relay, SourceHost
from tests.push.test_push import kill_agent

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.slow]


@pytest.fixture
def site(
    tmp_path: Path, private_bus_factory: Callable[..., PrivateBus], tls: TlsMaterial
) -> Iterator[Site]:
    (tmp_path / "site").mkdir()
    yield from start_site(tmp_path / "site", private_bus_factory, tls)


def test_push_install_job(  # noqa: PLR0917 - fixtures
    site: Site, host: SourceHost, key: Path, bundle: Bundle, prefix: Path, tmp_path: Path
) -> None:
    target = site.role("target", "appliance.target",
                       f'[storage]\ndatastore = "{tmp_path / "datastore"}"\n')  # fmt: skip
    site.enrol(target)
    target.start()
    process = site.role("process", "appliance.process",
                        f'[target]\naddress = "127.0.0.1:{target.port}"\n')  # fmt: skip
    site.enrol(process)
    (process.state_dir / BUNDLES).mkdir()
    shutil.copy(bundle.path, process.state_dir / BUNDLES)  # the cache: nothing to build
    process.start()
    relay = Relay(host.outside, ("127.0.0.1", site.configd.port))
    try:
        with loop_ext4(tmp_path, 32) as (device, _mnt):
            push = ["push-install", host.addr, "--key", str(key), "--disk", str(device),
                    "--machine", "push1", "--server", f"{host.outside}:{relay.port}",
                    "--test-prefix", str(prefix), "--test-without-systemd", "--wait"]  # fmt: skip
            first = site.ctl(*push, check=False)  # first contact: the fingerprint to check
            fingerprint = host.host_key_fingerprint()
            assert first.returncode == 1, first.stderr
            assert f"--accept-fingerprint {fingerprint}" in first.stdout + first.stderr
            done = site.ctl(*push, "--accept-fingerprint", fingerprint, timeout=600)
            job_id = done.stdout.splitlines()[0]
            job = site.ctl_json("job", job_id)
            assert job["state"] == "succeeded", job
            assert job["result"]["report"]["action"] == "installed"
            assert job["result"]["process_server"] == "process"
            assert machine(site, "push1") is not None
            assert "key" not in job["params"]
            assert "PRIVATE KEY" not in json.dumps(site.ctl_json("jobs", "--all"))
            assert "PRIVATE KEY" not in (site.configd.state_dir / "inventory.db").read_bytes(
            ).decode("latin-1")  # fmt: skip
    finally:
        relay.close()
        kill_agent(prefix)
