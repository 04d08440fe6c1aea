"""`secondsite-firstboot`: apply the vApp properties of the OVA once, at first boot.

The OVF environment comes through either transport the OVF declares: VMware Tools
(`guestinfo.ovfEnv`, only asked on VMware) or a CD-ROM holding `ovf-env.xml` (the ISO
transport, read without mounting by `ovfiso`). units/secondsite-firstboot.service runs
it in any VM before systemd-networkd starts, so the `.network` file it writes is the
one networkd reads. It goes through SetupCore,
exactly as the console does, and then writes the done-marker; the unit's
ConditionPathExists=! and the check below make every later boot a no-op, so changes
made on the console are never overwritten by the deployment's properties.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.daemon.cli import ConfigError, ExitCode, run_main
from appliance.daemon.logs import setup_logging
from appliance.setup import ovfiso
from appliance.storage.atomic import atomic_write

# The setup core (pyroute2, dbus, asyncio) is imported only when there is something to
# apply: on every boot without an environment this program must be done in a moment,
# and those imports alone take tens of seconds under emulation.
if TYPE_CHECKING:
    from appliance.setup.core import SetupCore
    from appliance.setup.ovfenv import OvfSettings

PROG = "secondsite-firstboot"
log = logging.getLogger("secondsite.firstboot")
STATE_DIR = Path("var/lib/secondsite/setup")  # under --root; the unit's StateDirectory=
DONE = STATE_DIR / "firstboot.done"
VMTOOLSD_ARGS = ["--cmd", "info-get guestinfo.ovfEnv"]
VMTOOLSD_TIMEOUT = 30.0
DMI_VENDOR = Path("/sys/class/dmi/id/sys_vendor")
# The ISO transport's drive is probed by udev's coldplug; wait for the queue, not longer.
UDEV_SETTLE = ["udevadm", "settle", "--timeout=15"]
SOURCES = ("auto", "guestinfo", "cdrom")

DESCRIPTION = """\
Applies the Secondsite OVA's deployment properties (hostname, role, network.mode,
network.address, network.gateway, network.dns) once, at first boot. They are read from
VMware Tools (vmtoolsd --cmd "info-get guestinfo.ovfEnv", on VMware only), else from
ovf-env.xml on a CD-ROM (the OVF ISO transport; read from the device, never mounted),
or from --env-file. Without properties nothing changes and the console's setup screen
asks instead.
"""

EPILOG = f"""\
files:
  /{DONE}   written when the properties were applied: later runs do nothing

exit status:
  0 applied, already done, or no properties; 2 bad command line;
  3 a property was rejected or could not be applied (the others were applied);
  1 other failure.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--env-file", type=Path, metavar="FILE",
                        help="read the OVF environment from FILE instead of vmtoolsd")  # fmt: skip
    parser.add_argument(
        "--source", choices=SOURCES, default="auto",
        help="where the environment is: guestinfo (VMware Tools), cdrom (ovf-env.xml on "
        "a CD-ROM), or auto (default): guestinfo on VMware, then the CD-ROM drives",
    )  # fmt: skip
    parser.add_argument(
        "--cdrom", type=Path, action="append", metavar="DEVICE",
        help="a CD-ROM device or ISO image to look at (repeatable; default: every "
        "/dev/sr* drive)",
    )  # fmt: skip
    parser.add_argument("--root", type=Path, default=Path("/"),
                        help="prefix for /etc and /var paths (tests, image builds)")  # fmt: skip
    parser.add_argument(
        "--systemd-bus", metavar="ADDRESS", default="system",
        help="where systemd's API is: 'system' (default), an address, or 'none' (no roles)",
    )  # fmt: skip
    parser.add_argument(
        "--management", metavar="IFACE",
        help="the interface the network properties are for (default: the one with the "
        "first VMware adapter's MAC address, or the only one)",
    )  # fmt: skip
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_main(PROG, lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    done = args.root / DONE
    if done.exists():
        log.info("first boot setup already done (%s): nothing to do", done)
        return ExitCode.OK
    text = read_file(args.env_file) if args.env_file else read_environment(args)
    if not text.strip():
        log.info("no OVF properties: the console's setup screen will ask")
        return ExitCode.OK
    return apply_environment(args, text, done)


def apply_environment(args: argparse.Namespace, text: str, done: Path) -> int:
    import asyncio

    from appliance.setup import ovfenv
    from appliance.setup.daemon import build_core

    try:
        settings = ovfenv.parse(text)
    except ovfenv.OvfEnvError as exc:
        raise ConfigError(str(exc), "the console's setup screen will ask instead") from None
    core = build_core(
        argparse.Namespace(
            root=args.root,
            systemd_bus=args.systemd_bus,
            management=args.management,
            state_dir=args.root / STATE_DIR,
        )
    )
    applied, problems = asyncio.run(apply(core, settings, args.management))
    write_done(done, applied)
    return ExitCode.CONFIG if problems else ExitCode.OK


def read_file(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None


def read_environment(args: argparse.Namespace) -> str:
    """The OVF environment from guestinfo or a CD-ROM, per --source; "" if none."""
    if args.source == "guestinfo" or (args.source == "auto" and on_vmware()):
        text = read_vmtoolsd()
        if text.strip() or args.source == "guestinfo":
            return text
    elif args.source == "auto":
        log.info("not on VMware: no guestinfo to read")
    return read_cdrom(args.cdrom)


def on_vmware() -> bool:
    try:
        return DMI_VENDOR.read_text().strip().startswith("VMware")
    except OSError:
        return False


def read_cdrom(devices: list[Path] | None) -> str:
    """ovf-env.xml from the first CD-ROM that has one, or ""."""
    if devices is None:
        settle_udev()
        devices = ovfiso.cdrom_devices()
        if not devices:
            log.info("no CD-ROM drive: no OVF environment on an ISO")
            return ""
    found = ovfiso.find_environment(devices)
    if found is None:
        log.info("no %s on %s", ovfiso.ENV_NAME, ", ".join(map(str, devices)))
        return ""
    device, text = found
    log.info("OVF environment read from %s on %s", ovfiso.ENV_NAME, device)
    return text


def settle_udev() -> None:
    """Let udev finish probing the drives the kernel found (bounded: UDEV_SETTLE)."""
    program = shutil.which(UDEV_SETTLE[0])
    if program is None:
        return
    try:
        subprocess.run([program, *UDEV_SETTLE[1:]], capture_output=True, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        log.warning("udevadm settle did not return; looking at the drives found so far")


def read_vmtoolsd() -> str:
    """guestinfo.ovfEnv, or "" when there is none: no VMware Tools, not on VMware, or a
    VM deployed without vApp options. `vmtoolsd --cmd` talks to the hypervisor itself;
    the open-vm-tools service need not run."""
    program = shutil.which("vmtoolsd")
    if program is None:
        log.info("vmtoolsd is not installed: no OVF properties to read")
        return ""
    try:
        done = subprocess.run(
            [program, *VMTOOLSD_ARGS],
            capture_output=True,
            text=True,
            timeout=VMTOOLSD_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        log.warning("vmtoolsd did not answer within %.0f s", VMTOOLSD_TIMEOUT)
        return ""
    if done.returncode != 0:
        # "No value found" (deployed without vApp options) or not a VMware guest.
        reason = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        log.info("vmtoolsd has no guestinfo.ovfEnv: %s", reason[0])
        return ""
    return done.stdout


async def apply(
    core: SetupCore, settings: OvfSettings, management: str | None
) -> tuple[list[str], list[str]]:
    """Apply what `settings` sets; (what was applied, one line per problem)."""
    from appliance.setup.errors import SetupError

    problems = [str(e) for e in settings.errors]
    for problem in problems:
        log.error("OVF property %s", problem)
    steps: list[tuple[str, Callable[[], Awaitable[Any]]]] = []
    if settings.hostname is not None:
        hostname = settings.hostname
        steps.append(("hostname", lambda: core.set_hostname(hostname)))
    if settings.network is not None:
        network = settings.network

        async def set_network() -> None:
            name = await management_interface(core, management, settings.adapter_macs)
            # Confirmed: at first boot nobody is connected who could be cut off.
            await core.set_interface(name, network.as_settings(), confirm=True)

        steps.append(("network", set_network))
    if settings.roles is not None:
        roles = [r.value for r in settings.roles]
        steps.append(("roles", lambda: core.set_roles(roles)))
    applied = []
    for what, step in steps:
        try:
            await step()
        except SetupError as exc:  # one property's failure must not stop the others
            log.error("cannot apply the %s: %s", what, exc.message)
            problems.append(f"{what}: {exc.message}")
        else:
            applied.append(what)
    log.info("first boot setup applied: %s", ", ".join(applied) or "nothing")
    return applied, problems


async def management_interface(core: SetupCore, wanted: str | None, macs: tuple[str, ...]) -> str:
    from appliance.setup.errors import Failed, NotFound

    records = await core.network()
    names = [str(r["name"]) for r in records]
    if wanted is not None:
        if wanted not in names:
            raise NotFound(f"no network interface {wanted!r}")
        return wanted
    by_mac = {str(r["mac"]).lower(): str(r["name"]) for r in records}
    for mac in macs:  # vSphere lists the adapters in the VM's order: the first is ours
        if mac in by_mac:
            return by_mac[mac]
    if len(names) == 1:
        return names[0]
    raise Failed(
        f"cannot tell which of {', '.join(names) or 'no interfaces'} is the management "
        "interface: no VMware adapter MAC address matches"
    )


def write_done(path: Path, applied: list[str]) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write(path, f"applied: {' '.join(applied) or 'nothing'}\n".encode(), 0o644)


if __name__ == "__main__":
    sys.exit(main())
