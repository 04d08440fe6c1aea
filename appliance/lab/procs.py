"""Start the lab's processes detached (own session, logs to files) and stop them by pid."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from appliance.daemon.cli import Unavailable
from appliance.lab.state import Proc


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picked it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _tail(log: Path, chars: int = 600) -> str:
    try:
        text = log.read_text(errors="replace")[-chars:].strip()
    except OSError:
        return ""
    return text.splitlines()[-1] if text else ""


def spawn(name: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> Proc:
    with log.open("ab") as out:  # the child keeps its own descriptor
        child = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})),
            start_new_session=True,  # a Ctrl-C in the operator's terminal is not for it
        )
    return Proc(name, child.pid, argv, str(log))


def start_notified(name: str, argv: list[str], log: Path, notify: Path, timeout: float) -> Proc:
    """Start a daemon and wait for READY=1 on our own NOTIFY_SOCKET."""
    notify.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.settimeout(0.5)
    try:
        proc = spawn(name, argv, log, {"NOTIFY_SOCKET": str(notify)})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if exited(proc):
                raise Unavailable(f"{name} exited at start: {_tail(log)}", f"see its log {log}")
            try:
                message = sock.recv(4096).decode()
            except TimeoutError:
                continue
            if "READY=1" in message.splitlines():
                return proc
        stop(proc, timeout=5)
        raise Unavailable(f"{name} did not become ready in {timeout:.0f} s", f"see {log}")
    finally:
        sock.close()
        notify.unlink(missing_ok=True)


def exited(proc: Proc) -> bool:
    """Whether a child this process started has exited. Unlike `alive`, it does not
    read /proc/PID/cmdline, which right after the spawn may not show the new program's
    arguments yet (a daemon was taken for dead that way)."""
    try:
        pid, _ = os.waitpid(proc.pid, os.WNOHANG)
    except ChildProcessError:  # not our child (or already reaped): judge by /proc
        return not alive(proc)
    return pid == proc.pid


def alive(proc: Proc) -> bool:
    """Whether `proc` still runs, and is still ours (the pid was not reused)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(proc.pid, os.WNOHANG)  # reap it if it is our own exited child
    try:
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        status = Path(f"/proc/{proc.pid}/stat").read_text()
    except OSError:
        return False
    if status.rsplit(")", 1)[-1].split()[0] == "Z":
        return False
    return [a.decode(errors="replace") for a in cmdline if a] == proc.argv


def stop(proc: Proc, timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after `timeout`; nothing if it is already gone."""
    if not alive(proc):
        return
    os.kill(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(proc):
            return
        time.sleep(0.1)
    if alive(proc):
        os.kill(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while alive(proc) and time.monotonic() < deadline:
            time.sleep(0.05)


# What the lab starts (`python -m MODULE ...`): only these are ever swept up as strays,
# never, say, an operator's `tail -f` of a log in the state directory.
LAB_MODULES = (
    "appliance.config",
    "appliance.target",
    "appliance.process",
    "agent",
    "appliance.lab.churn",
)


def strays(marker: str) -> list[Proc]:
    """Lab processes whose command line mentions `marker` (the lab's state directory):
    what a crash between starting a process and recording it in lab.json leaves."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            raw = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        argv = [a.decode(errors="replace") for a in raw if a]
        ours = (len(argv) > 2 and argv[1] == "-m" and argv[2] in LAB_MODULES) or (
            bool(argv) and Path(argv[0]).name == "dbus-daemon"
        )
        if ours and any(marker in arg for arg in argv):
            found.append(Proc("stray", int(entry.name), argv, ""))
    return found
