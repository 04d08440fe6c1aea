"""What the engine learns about a host before touching it, and where things go there.

One shell script prints key=value lines; `HostFacts.parse` reads them and `check`
refuses a host the agent cannot run on, before anything is copied."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from appliance.push.bundle import Platform
from appliance.push.errors import DiskFull, NoRoot, Unsupported

MIN_PYTHON = (3, 11)
ARCHES = ("x86_64", "aarch64")  # the manylinux wheels of the agent's dependencies
MIB = 1 << 20


@dataclass(frozen=True)
class Layout:
    """Paths on the host. `prefix` relocates all of them (tests: a temp root)."""

    prefix: str = ""

    def _p(self, path: str) -> str:
        return self.prefix.rstrip("/") + path

    @property
    def venv(self) -> str:
        return self._p("/opt/secondsite-agent")

    @property
    def staging(self) -> str:  # beside venv: the final rename stays on one filesystem
        return self._p("/opt/.secondsite-agent.new")

    @property
    def previous(self) -> str:  # the replaced venv, until the upgraded agent runs
        return self._p("/opt/.secondsite-agent.old")

    @property
    def config(self) -> str:
        return self._p("/etc/secondsite/agent.toml")

    @property
    def state(self) -> str:
        return self._p("/var/lib/secondsite/agent")

    @property
    def unit(self) -> str:
        return self._p("/etc/systemd/system/secondsite-agent.service")

    @property
    def tmp_parent(self) -> str:
        return self._p("/var/tmp")

    @property
    def pidfile(self) -> str:  # only without systemd (the test-only nohup start)
        return self._p("/run/secondsite-agent.pid")

    @property
    def log(self) -> str:
        return self._p("/var/log/secondsite-agent.log")


PROBE = r"""
free() { d=$1; while [ ! -d "$d" ]; do d=$(dirname "$d"); done
         df -Pk "$d" | awk 'NR==2 {print $4}'; }
if [ -r /etc/os-release ]; then . /etc/os-release; fi
echo "os=${PRETTY_NAME:-${ID:-unknown}}"
echo "kernel=$(uname -s)"
echo "arch=$(uname -m)"
echo "python=$(python3 --version 2>&1 | head -n 1)"
echo "glibc=$(getconf GNU_LIBC_VERSION 2>/dev/null)"
echo "uid=$(id -u)"
if [ "$(id -u)" != 0 ] && sudo -n true 2>/dev/null; then echo sudo=yes; else echo sudo=no; fi
if [ -d /run/systemd/system ]; then echo systemd=yes; else echo systemd=no; fi
if [ -d /sys/kernel/tracing/events ] || grep -qw tracefs /proc/filesystems; then
    echo tracefs=yes; else echo tracefs=no; fi
echo "free_opt=$(free {opt})"
echo "free_var=$(free {var})"
echo "installed=$(cat {venv}/.bundle 2>/dev/null)"
if [ -e {state}/enrolment.json ]; then echo enrolled=yes; else echo enrolled=no; fi
if [ -e {config} ]; then echo config=yes; else echo config=no; fi
if [ -e {state} ]; then echo state=yes; else echo state=no; fi
"""


def probe_script(layout: Layout) -> str:
    q = shlex.quote
    return (
        PROBE.replace("{opt}", q(layout.venv))
        .replace("{var}", q(layout.tmp_parent))
        .replace("{venv}", q(layout.venv))
        .replace("{state}", q(layout.state))
        .replace("{config}", q(layout.config))
    )


@dataclass(frozen=True)
class HostFacts:
    os: str
    kernel: str
    arch: str
    python: str  # as `python3 --version` printed it
    glibc: str
    uid: int
    sudo: bool
    systemd: bool
    tracefs: bool
    free_opt: int  # bytes
    free_var: int
    installed: str  # bundle sha256 of the agent installed there, "" if none
    enrolled: bool
    has_config: bool
    has_state: bool

    @classmethod
    def parse(cls, text: str) -> HostFacts:
        v = dict(line.partition("=")[::2] for line in text.splitlines() if "=" in line)

        def kib(key: str) -> int:
            return int(v[key]) * 1024 if v.get(key, "").isdigit() else 0

        return cls(
            os=v.get("os", "unknown"),
            kernel=v.get("kernel", ""),
            arch=v.get("arch", ""),
            python=v.get("python", ""),
            glibc=v.get("glibc", "").removeprefix("glibc ").strip(),
            uid=int(v["uid"]) if v.get("uid", "").isdigit() else -1,
            sudo=v.get("sudo") == "yes",
            systemd=v.get("systemd") == "yes",
            tracefs=v.get("tracefs") == "yes",
            free_opt=kib("free_opt"),
            free_var=kib("free_var"),
            installed=v.get("installed", "").strip(),
            enrolled=v.get("enrolled") == "yes",
            has_config=v.get("config") == "yes",
            has_state=v.get("state") == "yes",
        )

    @property
    def python_version(self) -> tuple[int, int] | None:
        m = re.fullmatch(r"Python (\d+)\.(\d+)(\.\S+)?", self.python.strip())
        return (int(m[1]), int(m[2])) if m else None

    @property
    def platform(self) -> Platform:
        version = self.python_version or (0, 0)
        return Platform(f"{version[0]}.{version[1]}", self.arch, self.glibc)


def check(facts: HostFacts, host: str, bundle_size: int) -> list[str]:
    """Refuse what the agent cannot run on; warnings for what it can live without."""
    if facts.kernel != "Linux":
        raise Unsupported(f"{host}: not Linux ({facts.kernel or 'unknown kernel'})")
    if facts.arch not in ARCHES:
        raise Unsupported(f"{host}: architecture {facts.arch} is not supported",
                          f"supported: {', '.join(ARCHES)}")  # fmt: skip
    version = facts.python_version
    if version is None:
        raise Unsupported(f"{host}: no usable python3 ({facts.python or 'not found'})",
                          "install Python 3.11 or newer (Debian: python3)")  # fmt: skip
    if version < MIN_PYTHON:
        raise Unsupported(
            f"{host}: Python {version[0]}.{version[1]} is too old for the agent",
            "the agent needs Python 3.11 or newer as python3",
        )
    if not re.fullmatch(r"\d+\.\d+", facts.glibc):
        raise Unsupported(f"{host}: no glibc found (musl?)", "the agent's wheels need glibc")
    if facts.uid != 0 and not facts.sudo:
        raise NoRoot(f"{host}: the install needs root or sudo; the user is neither",
                     "log in as root, or give the user sudo rights")  # fmt: skip
    # The venv is about 3x the wheels; the bundle is copied and unpacked under /var/tmp.
    need_opt, need_var = 4 * bundle_size + 32 * MIB, 2 * bundle_size + 16 * MIB
    for where, free, need in (("/opt", facts.free_opt, need_opt),
                              ("/var/tmp", facts.free_var, need_var)):  # fmt: skip
        if free < need:
            raise DiskFull(
                f"{host}: {free // MIB} MiB free for {where}, the agent needs {need // MIB} MiB",
                f"free space on the filesystem holding {where}",
            )
    warnings = []
    if not facts.tracefs:
        warnings.append("no tracefs in this kernel: the agent will track changes by scanning")
    return warnings
