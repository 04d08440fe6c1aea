"""Push installation: probe, copy, install, configure, enrol, start; and uninstall.

Each step is idempotent (it looks before it acts), so re-running an install after a
failure, or with the same bundle, does only what is missing; a newer bundle is an
upgrade (new venv, restart, the state directory untouched). Nothing is left
half-installed: the venv is built in a staging directory and renamed into place at
the end, the previous one kept until the new agent runs; a fresh install that fails
later removes what it created; the host's temp dir (bundle, passphrase) is removed in
a `finally`. Blocking: a job step calls `push_install` in a thread.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from appliance.push import hostkeys
from appliance.push.bundle import UNIT, Bundle, Platform
from appliance.push.errors import CopyFailed, InstallFailed, NoRoot, PushError, Unsupported
from appliance.push.probe import HostFacts, Layout, check, probe_script
from appliance.push.ssh import SYSTEM_PATH, Ssh, Sudo, Target, failure

COPY_ATTEMPTS = 3
IMAGE_BIN = "/opt/secondsite/bin/"  # where the unit in units/ names the agent
SERVICE = "secondsite-agent.service"


class Step(StrEnum):
    HOST_KEY = "host-key"
    PROBE = "probe"
    COPY = "copy"
    INSTALL = "install"
    CONFIGURE = "configure"
    ENROL = "enrol"
    SERVICE = "service"
    CLEANUP = "cleanup"
    REMOVE = "remove"


class Action(StrEnum):
    INSTALLED = "installed"
    UPGRADED = "upgraded"
    UNCHANGED = "unchanged"  # that bundle was installed already; only missing steps ran
    UNINSTALLED = "uninstalled"


Progress = Callable[[Step, str], None]
BundleSource = Bundle | Callable[[Platform], Bundle]


@dataclass(frozen=True)
class InstallReport:
    host: str
    fingerprint: str
    facts: HostFacts
    action: Action
    bundle: str = ""  # sha256 of the bundle now installed
    enrolled: bool = False
    started: bool = False
    notes: tuple[str, ...] = ()
    machine: str = ""  # uninstall: the name the agent was enrolled under


def _quiet(step: Step, message: str) -> None:
    pass


def push_install(
    host: str,
    *,
    user: str = "root",
    key: Path | None = None,
    password: str | None = None,
    known_hosts: Path,
    server: str,
    passphrase: str,
    bundle: BundleSource,
    progress: Progress | None = None,
    prefix: str = "",
    port: int = 22,
    disks: Sequence[str] = (),
    machine_id: str | None = None,
    accept_fingerprint: str | None = None,
    start_without_systemd: bool = False,
    path: str = SYSTEM_PATH,
) -> InstallReport:
    """Install (or upgrade to) `bundle` on `host` and enrol it with the configuration
    server at `server` (HOST:9440) using `passphrase`. Log in with `key` or `password`
    (a non-root user's sudo gets the same password if it asks for one).
    `accept_fingerprint`: the host key fingerprint the operator confirmed on first
    contact (see hostkeys.py).
    `start_without_systemd` is for tests: a host without systemd gets the agent started
    with nohup instead of "installed, not started". `path`: PATH of the commands run
    there (which python3 is used)."""
    run = _Run(_target(host, key, password, known_hosts, user, port), Layout(prefix),
               progress or _quiet, path)  # fmt: skip
    return run.install(
        source=bundle, server=server, passphrase=passphrase, disks=disks,
        machine_id=machine_id, accept=accept_fingerprint, nohup=start_without_systemd,
    )  # fmt: skip


def push_uninstall(
    host: str,
    *,
    user: str = "root",
    key: Path | None = None,
    password: str | None = None,
    known_hosts: Path,
    progress: Progress | None = None,
    prefix: str = "",
    port: int = 22,
    accept_fingerprint: str | None = None,
) -> InstallReport:
    """Stop the agent and remove everything push_install put there (venv, unit, config,
    state with the agent's certificate). The report's `machine` is the name the agent
    was enrolled under ("" if it was not)."""
    target = _target(host, key, password, known_hosts, user, port)
    return _Run(target, Layout(prefix), progress or _quiet).uninstall(accept_fingerprint)


def _target(  # noqa: PLR0917 - the login's parts, passed through
    host: str, key: Path | None, password: str | None, known_hosts: Path, user: str, port: int
) -> Target:
    if (key is None) == (password is None):
        raise ValueError("log in with either a key or a password")
    return Target(host, key, known_hosts, user, port, password)


@dataclass
class _Run:
    target: Target
    layout: Layout
    progress: Progress
    path: str = SYSTEM_PATH
    ssh: Ssh = field(init=False)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ssh = Ssh(self.target, path=self.path)

    def say(self, step: Step, message: str) -> None:
        self.progress(step, message)

    def connect(self, accept: str | None) -> tuple[str, HostFacts]:
        self.say(Step.HOST_KEY, f"checking the host key of {self.target.name}")
        fingerprint = hostkeys.verify(self.target, accept)
        self.say(Step.HOST_KEY, f"host key trusted: {fingerprint}")
        self.say(Step.PROBE, "checking OS, architecture, Python, privileges, free space")
        out = self.ssh.check(probe_script(self.layout), what="probe", error=InstallFailed)
        facts = HostFacts.parse(out)
        sudo = Sudo.NONE if facts.uid == 0 else Sudo.NOPASSWD if facts.sudo else Sudo.PASSWORD
        # sudo wants a password: the login's, if there is one and sudo takes it.
        if sudo is Sudo.PASSWORD and not self.sudo_takes_password():
            raise NoRoot(
                f"{self.target}: the install needs root or sudo; {self.target.user} is "
                "not root and sudo refused it",
                "log in as root, or give the user sudo rights (without a password, or "
                "log in with the password sudo asks for)",
            )
        self.ssh = Ssh(self.target, sudo=sudo, path=self.path)
        if sudo is not Sudo.NONE:
            how = " ".join(sudo.value.split()[:2])  # sudo -n / sudo -S
            self.say(Step.PROBE, f"{self.target.user} is not root: commands run with {how}")
            # Again as root: the user may not see into /opt, /etc/secondsite, the state.
            out = self.ssh.check(probe_script(self.layout), what="probe", error=InstallFailed)
            facts = dataclasses.replace(HostFacts.parse(out), uid=facts.uid, sudo=True)
        return fingerprint, facts

    def sudo_takes_password(self) -> bool:
        if self.target.password is None:
            return False
        return Ssh(self.target, sudo=Sudo.PASSWORD).run("true", what="sudo check").returncode == 0

    def install(
        self,
        *,
        source: BundleSource,
        server: str,
        passphrase: str,
        disks: Sequence[str],
        machine_id: str | None,
        accept: str | None,
        nohup: bool,
    ) -> InstallReport:
        fingerprint, facts = self.connect(accept)
        check(facts, self.target.host, 0)  # the platform first: it picks the bundle
        bundle = source if isinstance(source, Bundle) else source(facts.platform)
        if not bundle.platform.runs_on(facts.platform):
            raise Unsupported(
                f"{self.target.host}: the bundle is for Python {bundle.platform.python} on "
                f"{bundle.platform.arch} with glibc >= {bundle.platform.glibc}, the host has "
                f"{facts.python} on {facts.arch} with glibc {facts.glibc}"
            )
        self.notes += check(facts, self.target.host, bundle.size)
        self.say(Step.PROBE, f"{facts.os}, {facts.arch}, {facts.python}")
        fresh = not facts.installed and not facts.has_config and not facts.has_state
        action = (
            Action.UNCHANGED
            if facts.installed == bundle.sha256
            else Action.UPGRADED
            if facts.installed
            else Action.INSTALLED
        )
        tmp = ""
        try:
            tmp = self.ssh.check(
                f"mkdir -p {q(self.layout.tmp_parent)} && "
                f"find {q(self.layout.tmp_parent)} -maxdepth 1 -name 'secondsite-push.*' "
                f"-mmin +120 -exec rm -rf {{}} + ; "
                f"mktemp -d {q(self.layout.tmp_parent)}/secondsite-push.XXXXXXXX",
                what="temp dir", error=InstallFailed,
            ).strip()  # fmt: skip
            if action is not Action.UNCHANGED:
                self.copy(bundle, tmp)
                self.build_venv(bundle, tmp)
            self.configure(facts, disks, machine_id)
            enrolled = facts.enrolled or self.enrol(server, passphrase, tmp)
            started = self.service(facts, nohup)
            self.ssh.run(f"rm -rf {q(self.layout.previous)}", what="cleanup")
        except BaseException:
            self.rollback(fresh, action)
            raise
        finally:
            if tmp:
                self.say(Step.CLEANUP, "removing the temp dir on the host")
                try:
                    self.ssh.run(f"rm -rf {q(tmp)}", what="cleanup")
                except PushError as exc:
                    self.notes.append(f"could not remove {tmp}: {exc.message}")
        return InstallReport(self.target.host, fingerprint, facts, action, bundle.sha256,
                             enrolled, started, tuple(self.notes))  # fmt: skip

    def copy(self, bundle: Bundle, tmp: str) -> None:
        part, final = f"{tmp}/bundle.tar.part", f"{tmp}/bundle.tar"
        timeout = 60 + bundle.size / (1 << 20)  # at least 1 MiB/s
        last: PushError | None = None
        for attempt in range(1, COPY_ATTEMPTS + 1):
            self.say(Step.COPY, f"copying the bundle ({bundle.size >> 20} MiB), "
                                f"attempt {attempt}/{COPY_ATTEMPTS}")  # fmt: skip
            try:
                done = self.ssh.run(f"cat > {q(part)}", stdin=bundle.path, timeout=timeout,
                                    what="copy")  # fmt: skip
                if done.returncode != 0:
                    raise failure("copy interrupted", done, CopyFailed)
                out = self.ssh.check(f"sha256sum {q(part)}", what="checksum", error=CopyFailed)
                if out.split()[:1] != [bundle.sha256]:
                    raise CopyFailed("the copied bundle's checksum does not match")
                self.ssh.check(f"mv {q(part)} {q(final)}", what="copy", error=CopyFailed)
                self.say(Step.COPY, "bundle copied, sha256 verified")
                return
            except CopyFailed as exc:  # DiskFull and SSH failures are not retried
                last = exc
                self.ssh.run(f"rm -f {q(part)}", what="cleanup")
        raise CopyFailed(f"{self.target.host}: the bundle did not arrive intact after "
                         f"{COPY_ATTEMPTS} attempts ({last.message if last else ''})")  # fmt: skip

    def build_venv(self, bundle: Bundle, tmp: str) -> None:
        self.say(Step.INSTALL, f"installing secondsite {bundle.version} into a new venv")
        lay = self.layout
        new, venv = q(lay.staging), q(lay.venv)
        script = f"""set -e
rm -rf {new}
mkdir -p "$(dirname {new})" {q(tmp)}/b
tar -xf {q(tmp)}/bundle.tar -C {q(tmp)}/b
rm -f {q(tmp)}/bundle.tar
python3 -m venv --without-pip {new}
pip=$(ls {q(tmp)}/b/wheels/pip-*.whl | head -n 1)
"{new}/bin/python" "$pip/pip" install --quiet --no-index --no-cache-dir \
    --disable-pip-version-check --root-user-action=ignore \
    --find-links {q(tmp)}/b/wheels secondsite=={q(bundle.version)}
# Scripts name their interpreter by absolute path: the venv's final one.
for f in {new}/bin/* {new}/pyvenv.cfg; do
    if [ -f "$f" ] && [ ! -L "$f" ]; then sed -i "s|{lay.staging}|{lay.venv}|g" "$f"; fi
done
cp {q(tmp)}/b/{UNIT} {new}/.unit-template
echo {bundle.sha256} > {new}/.bundle
"""
        try:
            self.ssh.check(script, what="venv install", error=InstallFailed, timeout=600.0)
        except BaseException:
            self.ssh.run(f"rm -rf {new}", what="cleanup")
            raise
        self.ssh.check(f"set -e; rm -rf {q(lay.previous)}; "
                       f"if [ -e {venv} ]; then mv {venv} {q(lay.previous)}; fi; "
                       f"mv {new} {venv}", what="venv swap", error=InstallFailed)  # fmt: skip
        self.say(Step.INSTALL, f"installed in {lay.venv}")

    def configure(self, facts: HostFacts, disks: Sequence[str], machine_id: str | None) -> None:
        if facts.has_config:
            self.say(Step.CONFIGURE, f"{self.layout.config} exists: kept")
            return
        lines = ["# Written by push installation. After a change:",
                 "#   systemctl restart secondsite-agent", "[agent]"]  # fmt: skip
        if machine_id:
            lines.append(f"machine_id = {json.dumps(machine_id)}")
        lines.append(f"state_dir = {json.dumps(self.layout.state)}")
        lines.append(f"disks = {json.dumps(list(disks))}")
        config = q(self.layout.config)
        self.ssh.check(
            f'set -e; mkdir -p "$(dirname {config})"; umask 022; '
            f"cat > {config}.tmp; mv {config}.tmp {config}",
            stdin=("\n".join(lines) + "\n").encode(), what="config", error=InstallFailed,
        )  # fmt: skip
        self.say(Step.CONFIGURE, f"wrote {self.layout.config}")

    def enrol(self, server: str, passphrase: str, tmp: str) -> bool:
        self.say(Step.ENROL, f"enrolling with the configuration server {server}")
        secret = q(f"{tmp}/passphrase")
        try:
            self.ssh.check(f"umask 077; cat > {secret}", stdin=passphrase.encode() + b"\n",
                           what="passphrase", error=InstallFailed)  # fmt: skip
            out = self.ssh.check(
                f"{q(self.layout.venv)}/bin/secondsite-agent enroll --config "
                f"{q(self.layout.config)} --server {q(server)} --passphrase-file {secret}",
                what="enrolment", error=InstallFailed, timeout=120.0,
            )  # fmt: skip
        finally:
            self.ssh.run(f"rm -f {secret}", what="cleanup")
        self.say(Step.ENROL, out.strip().splitlines()[-1] if out.strip() else "enrolled")
        return True

    def service(self, facts: HostFacts, nohup: bool) -> bool:
        unit = q(self.layout.unit)
        self.ssh.check(
            f'set -e; mkdir -p "$(dirname {unit})"; '
            f"sed -e {q(self.exec_rewrite())} {q(self.layout.venv)}/.unit-template > {unit}.tmp; "
            f"printf '\\n[Install]\\nWantedBy=multi-user.target\\n' >> {unit}.tmp; "
            f"if cmp -s {unit}.tmp {unit}; then rm {unit}.tmp; else mv {unit}.tmp {unit}; fi",
            what="unit", error=InstallFailed,
        )  # fmt: skip
        if facts.systemd:
            self.say(Step.SERVICE, f"starting {SERVICE}")
            self.ssh.check(
                f"systemctl daemon-reload && systemctl enable --quiet {SERVICE} && "
                f"systemctl restart {SERVICE} && systemctl is-active {SERVICE}",
                what="service start", error=InstallFailed, timeout=180.0,
            )  # fmt: skip
            self.say(Step.SERVICE, f"{SERVICE} is active")
            return True
        if not nohup:
            self.notes.append("installed, not started: no systemd")
            self.say(Step.SERVICE, "installed, not started: no systemd")
            return False
        self.say(Step.SERVICE, "no systemd: starting the agent with nohup (test mode)")
        lay = self.layout
        self.ssh.check(
            _STOP_NOHUP.format(pidfile=q(lay.pidfile))
            + f'mkdir -p "$(dirname {q(lay.pidfile)})" "$(dirname {q(lay.log)})"\n'
            f"setsid nohup {q(lay.venv)}/bin/secondsite-agent run --config {q(lay.config)} "
            f">> {q(lay.log)} 2>&1 < /dev/null &\n"
            f"echo $! > {q(lay.pidfile)}\nsleep 2\n"
            f'kill -0 "$(cat {q(lay.pidfile)})" || {{ tail -n 5 {q(lay.log)} >&2; exit 1; }}\n',
            what="agent start", error=InstallFailed,
        )  # fmt: skip
        return True

    def exec_rewrite(self) -> str:
        venv_bin = f"{self.layout.venv}/bin/"
        config = self.layout.config
        return (
            f"s|^ExecStart={IMAGE_BIN}secondsite-agent run$|"
            f"ExecStart={venv_bin}secondsite-agent run --config {config}|"
        )

    def rollback(self, fresh: bool, action: Action) -> None:
        """After a failure: a fresh install is removed; an upgrade gets its old venv back."""
        lay = self.layout
        try:
            if fresh:
                self.say(Step.CLEANUP, "install failed: removing what it created")
                self.ssh.run(_STOP_NOHUP.format(pidfile=q(lay.pidfile)) + "rm -rf "
                             + " ".join(q(p) for p in (lay.venv, lay.staging, lay.previous,
                                                       lay.config, lay.state, lay.unit,
                                                       lay.pidfile)),
                             what="rollback")  # fmt: skip
            elif action is Action.UPGRADED:
                self.say(Step.CLEANUP, "upgrade failed: restoring the previous venv")
                old, venv = q(lay.previous), q(lay.venv)
                self.ssh.run(f"if [ -d {old} ]; then rm -rf {venv} && mv {old} {venv}; fi",
                             what="rollback")  # fmt: skip
        except PushError as exc:
            self.notes.append(f"rollback incomplete: {exc.message}")

    def uninstall(self, accept: str | None) -> InstallReport:
        fingerprint, facts = self.connect(accept)
        lay = self.layout
        machine = ""
        if facts.enrolled:
            out = self.ssh.run(f"cat {q(lay.state)}/enrolment.json", what="read").stdout
            try:
                machine = str(json.loads(out).get("name", ""))
            except ValueError:
                machine = ""
        self.say(Step.REMOVE, "stopping the agent")
        stop = (
            f"systemctl disable --now --quiet {SERVICE} 2>/dev/null || true\n"
            if facts.systemd
            else ""
        )
        self.ssh.check(
            stop + _STOP_NOHUP.format(pidfile=q(lay.pidfile))
            + "rm -rf " + " ".join(q(p) for p in (lay.unit, lay.venv, lay.staging, lay.previous,
                                                   lay.config, lay.state, lay.pidfile, lay.log))
            + "\n" + ("systemctl daemon-reload\n" if facts.systemd else "")
            + f'rmdir "$(dirname {q(lay.config)})" "$(dirname {q(lay.state)})" 2>/dev/null'
            + " || true\n",
            what="uninstall", error=InstallFailed,
        )  # fmt: skip
        self.say(Step.REMOVE, "removed the agent, its unit, configuration and state")
        self.notes.append(
            f"revoke machine {machine or self.target.host}'s certificate through the "
            "configuration server (its enrolment is still valid there)"
        )
        return InstallReport(self.target.host, fingerprint, facts, Action.UNINSTALLED,
                             notes=tuple(self.notes), machine=machine)  # fmt: skip


# Stops an agent started with nohup (test hosts without systemd), waiting up to 30 s.
_STOP_NOHUP = """pid=$(cat {pidfile} 2>/dev/null || true)
if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid"; i=0
    while kill -0 "$pid" 2>/dev/null && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
    kill -9 "$pid" 2>/dev/null || true
fi
"""


def q(text: str) -> str:
    return shlex.quote(text)
