"""`secondsite-setupd`: org.secondsite.Setup1, the appliance's setup service.

D-Bus activated (units/dbus-1/system-services/org.secondsite.Setup1.service): the bus
starts it on the first call, and with --idle-exit it leaves after that many seconds
without a call, so it costs nothing between setups. Leaving gives up the name first;
the next call activates it again.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from pathlib import Path

from appliance.daemon.cli import Unavailable, run_main
from appliance.daemon.logs import setup_logging
from appliance.daemon.sdnotify import Notifier
from appliance.setup import network, registration
from appliance.setup import time as ntp_time
from appliance.setup.core import SetupCore
from appliance.setup.enrolment import Enroller
from appliance.setup.hostname import Hostname
from appliance.setup.journal import Journal
from appliance.setup.network import Network, NetworkdFiles
from appliance.setup.networkd import Networkd
from appliance.setup.registration import Registration
from appliance.setup.roles import Roles
from appliance.setup.services import Services
from appliance.setup.setupstate import SetupState
from appliance.setup.systemd import SystemdClient

PROG = "secondsite-setupd"
log = logging.getLogger("secondsite.setupd")
IDLE_CHECK = 1.0

DESCRIPTION = """\
The Secondsite appliance's setup service: reads and sets the network interfaces
(applied with netlink, persisted as systemd-networkd files), the hostname, the NTP
servers, the roles this appliance runs (role targets enabled and started through
systemd's D-Bus API) and the configuration server it registers with. Registering
enrols the process-server and master-target daemons (each daemon's --enroll, run as
a transient systemd service) and starts their units. It also starts, stops and
restarts the appliance's own units and reads their journal (journalctl), and after
a network change asks systemd-networkd to reload. It serves org.secondsite.Setup1 on
the system bus to root and the secondsite group; the console is its client.
"""

EPILOG = f"""\
files:
  /etc/systemd/network/{network.FILE_PREFIX}IFACE.network   per-interface settings
  /etc/hostname                                      the static hostname
  /etc/systemd/timesyncd.conf.d/{ntp_time.DROPIN}         NTP servers
  {registration.DEFAULT_DIRECTORY}/                 configuration server and passphrase (root only)
  {registration.DEFAULT_DIRECTORY}/enrol-ROLE.log    the last enrolment's errors
  {registration.DEFAULT_DIRECTORY}/setup.done        the console's wizard was used

exit status:
  0 stopped (SIGTERM or idle), 2 bad command line, 4 the bus could not be used,
  1 other failure.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--bus", metavar="ADDRESS", help="serve on this bus (default: system)")
    parser.add_argument(
        "--systemd-bus", metavar="ADDRESS", default="system",
        help="where systemd's API is: 'system' (default), an address, or 'none' (no roles)",
    )  # fmt: skip
    parser.add_argument(
        "--networkd-bus", metavar="ADDRESS", default="system",
        help="where systemd-networkd is asked to reload after a network change: "
        "'system' (default), an address, or 'none' (the files apply at the next boot)",
    )  # fmt: skip
    parser.add_argument("--root", type=Path, default=Path("/"),
                        help="prefix for /etc paths (tests, image builds)")  # fmt: skip
    parser.add_argument("--state-dir", type=Path, default=registration.DEFAULT_DIRECTORY,
                        help="where the registration is kept")  # fmt: skip
    parser.add_argument("--management", metavar="IFACE",
                        help="the management interface (default: the default route's)")  # fmt: skip
    parser.add_argument(
        "--idle-exit", type=float, default=0.0, metavar="SECONDS",
        help="exit after this long without a call (0: never)",
    )  # fmt: skip
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.set_defaults(enrol=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_main(PROG, lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    asyncio.run(serve(args))
    return 0


def build_core(args: argparse.Namespace) -> SetupCore:
    from pyroute2 import IPRoute

    root: Path = args.root
    registration = Registration(args.state_dir)
    systemd = None if args.systemd_bus == "none" else SystemdClient(
        None if args.systemd_bus == "system" else args.systemd_bus
    )  # fmt: skip
    return SetupCore(
        Network(IPRoute, NetworkdFiles(root / "etc/systemd/network"), args.management),
        Hostname(root),
        ntp_time.Ntp(
            root / "etc/systemd/timesyncd.conf.d",
            systemd.try_restart if systemd is not None else None,
        ),
        registration,
        Roles(systemd) if systemd is not None else None,
        services=Services(systemd, Journal()),
        networkd=_networkd(getattr(args, "networkd_bus", "none")),
        # Only setupd enrols: secondsite-firstboot runs before the network is up.
        enroller=Enroller(registration, systemd) if getattr(args, "enrol", False) else None,
        setup_state=SetupState(root, args.state_dir),
    )


def _networkd(where: str) -> Networkd:
    # Callers without the option (secondsite-firstboot, which runs before networkd
    # and must not D-Bus-activate it) get none: networkd reads the files when it starts.
    return Networkd(None if where == "system" else where)


async def serve(args: argparse.Namespace, notifier: Notifier | None = None) -> None:
    from appliance.setup.dbus_service import ServeError, serve_setup1

    notifier = notifier or Notifier()
    core = build_core(args)
    loop = asyncio.get_running_loop()
    try:
        server = serve_setup1(core, loop, args.bus)
    except ServeError as exc:
        raise Unavailable(str(exc), "check the D-Bus policy file and --bus") from None
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("serving org.secondsite.Setup1 (idle exit: %s s)", args.idle_exit or "never")
    notifier.ready("Serving org.secondsite.Setup1")
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), IDLE_CHECK)
            if args.idle_exit and server.idle_seconds() >= args.idle_exit:
                log.info("idle for %.0f s: exiting", server.idle_seconds())
                break
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        notifier.stopping()
        server.close()
    log.info("stopped")
