"""A private `dbus-daemon` with a system-bus-like policy, for the lab and the tests.

Like the system bus: method calls and name ownership are denied by default, signals
and replies flow, and extra policy files (ours, from `units/`) are read from an
include directory — so a test sees the same refusals a caller on the appliance would.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from appliance.daemon.cli import Unavailable

_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Properties"/>
  </policy>
  <includedir>{policy_dir}</includedir>
</busconfig>
"""


@dataclass
class PrivateBus:
    address: str
    socket: Path
    policy_dir: Path
    process: subprocess.Popen[bytes]
    argv: list[str]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_private_bus(
    directory: Path,
    policies: Iterable[Path] = (),
    *,
    new_session: bool = False,
    log: Path | None = None,
) -> PrivateBus:
    """Start a dbus-daemon under `directory` with `policies` installed; return its address.
    `new_session`: a session of its own (the lab's bus outlives `secondsite-lab up` and a
    Ctrl-C in the operator's terminal is not for it)."""
    daemon = shutil.which("dbus-daemon")
    if daemon is None:
        raise Unavailable("dbus-daemon is not installed", "apt-get install dbus")
    policy_dir = directory / "system.d"
    policy_dir.mkdir(parents=True, exist_ok=True)
    for policy in policies:
        shutil.copy(policy, policy_dir / policy.name)
    socket = directory / "system_bus_socket"
    config = directory / "bus.conf"
    config.write_text(_CONFIG.format(socket=socket, policy_dir=policy_dir))
    read_fd, write_fd = os.pipe()
    argv = [daemon, f"--config-file={config}", "--nofork", "--nopidfile",
            f"--print-address={write_fd}"]  # fmt: skip
    with open(log or os.devnull, "ab") as err:  # the child keeps its own descriptor
        process = subprocess.Popen(
            # No stdout: a daemon holding its caller's pipe would keep a
            # `subprocess.run(capture_output=True)` of `lab up` waiting forever.
            argv, pass_fds=(write_fd,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=err if log else None,
            start_new_session=new_session,
        )  # fmt: skip
    os.close(write_fd)
    try:
        ready, _, _ = select.select([read_fd], [], [], 10)
        line = os.read(read_fd, 4096).decode().strip() if ready else ""
    finally:
        os.close(read_fd)
    if not line:
        process.kill()
        process.wait()
        raise Unavailable("dbus-daemon did not print its address within 10 s")
    return PrivateBus(line.splitlines()[0], socket, policy_dir, process, argv)
