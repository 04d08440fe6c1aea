"""Push installation against a real sshd in a network namespace (see host.py).

Every install path is under a temp `prefix`; the agent is started with nohup (this
machine has no systemd as PID 1). The end-to-end test enrols with a real configd."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from appliance.push import hostkeys
from appliance.push.bundle import Bundle, load_bundle
from appliance.push.errors import (
    BadCredentials,
    CopyFailed,
    DiskFull,
    HostKeyChanged,
    InstallFailed,
    UnknownHostKey,
    Unreachable,
    Unsupported,
)
from appliance.push.install import Action, Step, push_install, push_uninstall
from appliance.push.ssh import SYSTEM_PATH, Target
from tests.integration.configsite import Site, machine
from tests.loopfs import loop_ext4
from tests.push.host import Relay, SourceHost, keypair, sh

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.slow]

INSTALLED = ("opt/secondsite-agent", "etc/secondsite/agent.toml", "var/lib/secondsite/agent",
             "etc/systemd/system/secondsite-agent.service")  # fmt: skip


def left_behind(prefix: Path) -> list[str]:
    """Files under prefix other than empty directories."""
    return sorted(str(p.relative_to(prefix)) for p in prefix.rglob("*") if not p.is_dir())


def trust(host: SourceHost, known_hosts: Path, key: Path) -> str:
    """First contact: refused with the fingerprint, which the test then accepts."""
    with pytest.raises(UnknownHostKey) as caught:
        push_uninstall(host.addr, key=key, known_hosts=known_hosts, prefix="/nonexistent")
    fingerprint = caught.value.fingerprint
    assert fingerprint == host.host_key_fingerprint()
    assert hostkeys.verify(Target(host.addr, key, known_hosts), fingerprint) == fingerprint
    return fingerprint


class Steps:
    def __init__(self) -> None:
        self.seen: list[tuple[Step, str]] = []

    def __call__(self, step: Step, message: str) -> None:
        self.seen.append((step, message))


def kwargs(host: SourceHost, tmp: Path, key: Path, bundle: Bundle, prefix: Path,
           **more: object) -> dict[str, Any]:  # fmt: skip
    return {"key": key, "known_hosts": tmp / "known_hosts", "server": "127.0.0.1:9",
            "passphrase": "unused", "bundle": bundle, "prefix": str(prefix),
            "start_without_systemd": True, "disks": ["/dev/null"], **more}  # fmt: skip


def newer(bundle: Bundle, tmp: Path) -> Bundle:
    """The same wheels with another bundle.json: another bundle (sha256) to upgrade to."""
    out = tmp / "newer.tar"
    with tarfile.open(bundle.path) as src, tarfile.open(out, "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member)
            assert data is not None
            body = data.read()
            if member.name == "bundle.json":
                body = json.dumps(json.loads(body) | {"label": "upgrade"}).encode()
                member.size = len(body)
            dst.addfile(member, io.BytesIO(body))
    return load_bundle(out)


def agent_pid(prefix: Path) -> int:
    pid = int((prefix / "run/secondsite-agent.pid").read_text())
    os.kill(pid, 0)
    return pid


def test_push_install_enrols_then_upgrade_and_uninstall(  # noqa: PLR0917 - fixtures
    site: Site, host: SourceHost, key: Path, bundle: Bundle, prefix: Path, tmp_path: Path
) -> None:
    known_hosts = tmp_path / "known_hosts"
    fingerprint = trust(host, known_hosts, key)
    relay = Relay(host.outside, ("127.0.0.1", site.configd.port))
    steps = Steps()
    try:
        with loop_ext4(tmp_path, 32) as (device, _mnt):
            started = time.monotonic()
            report = push_install(
                host.addr, key=key, known_hosts=known_hosts,
                server=f"{host.outside}:{relay.port}",
                passphrase=site.passphrase_file.read_text().strip(), bundle=bundle,
                progress=steps, prefix=str(prefix), disks=[str(device)], machine_id="push1",
                accept_fingerprint=fingerprint, start_without_systemd=True,
            )  # fmt: skip
            print(f"install took {time.monotonic() - started:.1f} s")
            assert report.action is Action.INSTALLED and report.enrolled and report.started
            assert report.fingerprint == fingerprint and report.bundle == bundle.sha256
            assert [s for s in Step if s in {x for x, _ in steps.seen}] == [
                Step.HOST_KEY, Step.PROBE, Step.COPY, Step.INSTALL, Step.CONFIGURE,
                Step.ENROL, Step.SERVICE, Step.CLEANUP,
            ]  # fmt: skip
            site.wait("push1 in secondsitectl machines", lambda: machine(site, "push1"))
            for path in INSTALLED:
                assert (prefix / path).exists(), path
            unit = (prefix / INSTALLED[3]).read_text()
            assert f"ExecStart={prefix}/opt/secondsite-agent/bin/secondsite-agent run" in unit
            assert "WantedBy=multi-user.target" in unit
            assert not list((prefix / "var/tmp").iterdir()), "temp dir left on the host"
            first_pid = agent_pid(prefix)
            state = prefix / "var/lib/secondsite/agent"
            enrolment = (state / "enrolment.json").read_bytes()
            (state / "tracking-marker").write_text("kept")

            # Same bundle again: nothing copied, nothing reinstalled.
            again = push_install(host.addr, **kwargs(host, tmp_path, key, bundle, prefix))
            assert again.action is Action.UNCHANGED and again.facts.enrolled

            started = time.monotonic()
            upgraded = push_install(
                host.addr, **kwargs(host, tmp_path, key, newer(bundle, tmp_path), prefix)
            )
            print(f"upgrade took {time.monotonic() - started:.1f} s")
            assert upgraded.action is Action.UPGRADED and upgraded.started
            assert (state / "tracking-marker").read_text() == "kept"
            assert (state / "enrolment.json").read_bytes() == enrolment
            assert agent_pid(prefix) != first_pid
            assert not (prefix / "opt/.secondsite-agent.old").exists()

            gone = push_uninstall(host.addr, key=key, known_hosts=known_hosts,
                                  prefix=str(prefix))  # fmt: skip
            assert gone.action is Action.UNINSTALLED
            assert any("revoke machine push1" in n for n in gone.notes), gone.notes
            assert left_behind(prefix) == []
            for path in INSTALLED:
                assert not (prefix / path).exists(), path
            with pytest.raises(ProcessLookupError):
                os.kill(first_pid, 0)
    finally:
        relay.close()
        kill_agent(prefix)


def kill_agent(prefix: Path) -> None:
    """If a test failed with the agent running, stop it (by its pid file)."""
    pidfile = prefix / "run/secondsite-agent.pid"
    with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
        os.kill(int(pidfile.read_text()), signal.SIGKILL)


def test_unreachable_port(host: SourceHost, key: Path, bundle: Bundle, prefix: Path,
                          tmp_path: Path) -> None:  # fmt: skip
    with pytest.raises(Unreachable, match="no SSH host key offered"):
        push_install(host.addr, port=2222, **kwargs(host, tmp_path, key, bundle, prefix))
    assert left_behind(prefix) == []


def test_wrong_key_is_bad_credentials(host: SourceHost, key: Path, bundle: Bundle,
                                      prefix: Path, tmp_path: Path) -> None:  # fmt: skip
    fingerprint = trust(host, tmp_path / "known_hosts", key)
    other = keypair(tmp_path / "other")
    with pytest.raises(BadCredentials, match="authentication failed"):
        push_install(host.addr, **kwargs(host, tmp_path, other, bundle, prefix,
                                         accept_fingerprint=fingerprint))  # fmt: skip
    assert left_behind(prefix) == []


def test_changed_host_key_is_refused_before_anything_is_copied(
    host: SourceHost, key: Path, bundle: Bundle, prefix: Path, tmp_path: Path
) -> None:
    known_hosts = tmp_path / "known_hosts"
    with pytest.raises(UnknownHostKey):  # first contact, trusted below
        push_install(host.addr, **kwargs(host, tmp_path, key, bundle, prefix))
    trust(host, known_hosts, key)
    before = known_hosts.read_text()
    host.start_sshd(new_keys=True)  # the host was "reinstalled" (or it is an impostor)
    with pytest.raises(HostKeyChanged) as caught:
        push_install(host.addr, **kwargs(host, tmp_path, key, bundle, prefix))
    assert caught.value.offered == host.host_key_fingerprint()
    assert known_hosts.read_text() == before
    assert left_behind(prefix) == []
    assert not (prefix / "var/tmp").exists()


def test_old_python_is_unsupported(host: SourceHost, key: Path, bundle: Bundle, prefix: Path,
                                   tmp_path: Path) -> None:  # fmt: skip
    fake = tmp_path / "fakebin"
    fake.mkdir()
    (fake / "python3").write_text("#!/bin/sh\necho 'Python 3.8.10'\n")
    (fake / "python3").chmod(0o755)
    fingerprint = host.host_key_fingerprint()
    with pytest.raises(Unsupported, match=r"Python 3\.8 is too old"):
        push_install(host.addr, **kwargs(host, tmp_path, key, bundle, prefix,
                                         accept_fingerprint=fingerprint,
                                         path=f"{fake}:{SYSTEM_PATH}"))  # fmt: skip
    assert left_behind(prefix) == []


def test_disk_full_leaves_nothing(host: SourceHost, key: Path, bundle: Bundle, prefix: Path,
                                  tmp_path: Path) -> None:  # fmt: skip
    sh("mount", "-t", "tmpfs", "-o", "size=8m", "pushfull", str(prefix))
    try:
        host.start_sshd()  # `ip netns exec` copied the mounts when sshd started
        with pytest.raises(DiskFull, match="MiB free for /opt"):
            fingerprint = host.host_key_fingerprint()
            push_install(host.addr, **kwargs(host, tmp_path, key, bundle, prefix,
                                             accept_fingerprint=fingerprint))  # fmt: skip
        assert left_behind(prefix) == []
    finally:
        sh("umount", str(prefix))


class CopyKiller:
    """Kills this process's `ssh ... cat > …/bundle.tar.part` children (the transfer),
    the first `times` it sees."""

    def __init__(self, times: int) -> None:
        self.times = times
        self.killed = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.is_set() and self.killed < self.times:
            for proc in Path("/proc").iterdir():
                if proc.name.isdigit() and self.is_copy(proc):
                    time.sleep(0.5)  # mid-transfer
                    try:
                        os.kill(int(proc.name), signal.SIGKILL)
                        self.killed += 1
                    except ProcessLookupError:
                        pass
            time.sleep(0.05)

    @staticmethod
    def is_copy(proc: Path) -> bool:
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
        # Only the transfer: under load the checksum, mv or rm of the .part file (also
        # an ssh naming it) may still run when the killer looks, and killing one of
        # those would not be an interrupted copy.
        if ppid != os.getpid() or argv[0] != b"ssh" or len(argv) < 2:
            return False
        return b"cat > " in argv[-2] and b"bundle.tar.part" in argv[-2]

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


@pytest.mark.parametrize("kills", [1, 3])
def test_interrupted_copy_is_retried_and_cleaned(  # noqa: PLR0917 - fixtures
    host: SourceHost, key: Path, bundle: Bundle, prefix: Path, tmp_path: Path, kills: int
) -> None:
    # ~4 s for the bundle through the link, so there is a transfer to kill.
    # (tbf: this kernel has no sch_netem module)
    sh("tc", "qdisc", "add", "dev", host.host_if, "root", "tbf", "rate", "40mbit",
       "burst", "32kb", "latency", "400ms")  # fmt: skip
    killer = CopyKiller(kills)
    steps = Steps()
    try:
        args = kwargs(host, tmp_path, key, bundle, prefix, progress=steps,
                      accept_fingerprint=host.host_key_fingerprint())  # fmt: skip
        if kills >= 3:  # every attempt killed
            with pytest.raises(CopyFailed, match="after 3 attempts"):
                push_install(host.addr, **args)
        else:  # the retry arrives; enrolment then fails (nothing listens at the server)
            with pytest.raises(InstallFailed, match="enrolment failed"):
                push_install(host.addr, **args)
            assert any("sha256 verified" in m for _, m in steps.seen)
    finally:
        killer.close()
    assert killer.killed == kills
    assert sum("attempt" in m for s, m in steps.seen if s is Step.COPY) == kills + (kills < 3)
    assert left_behind(prefix) == [], "a failed install must leave nothing"
