"""The parts every role daemon's main shares: flags, checks, and the serve-until-stopped loop."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import signal
import socket
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from appliance.daemon.cli import ConfigError, Unavailable
from appliance.daemon.sdnotify import Notifier
from appliance.wire.tls import server_context

T = TypeVar("T")
log = logging.getLogger(__name__)

EXIT_STATUS = """\
exit status:
  0 stopped cleanly, 2 bad command line, 3 bad configuration,
  4 a resource (port, directory) could not be used, 1 other failure."""


def add_common_arguments(parser: argparse.ArgumentParser, default_config: Path) -> None:
    parser.add_argument(
        "--config", type=Path, metavar="FILE",
        help=f"configuration file (default {default_config}, used only if it exists)",
    )  # fmt: skip
    parser.add_argument("--state-dir", metavar="DIR", help="overrides server.state_dir")
    parser.add_argument("--listen", metavar="HOST:PORT", help="overrides server.listen")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument(
        "--check-config", action="store_true",
        help="print the resolved configuration as JSON and exit",
    )  # fmt: skip


def add_enrol_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "enrolment", "enrol with the configuration server, store the certificate, and exit"
    )
    group.add_argument(
        "--enroll",
        metavar="HOST:PORT",
        help="the configuration server to enrol with (its port is 9440)",
    )
    group.add_argument(
        "--passphrase-file",
        type=Path,
        metavar="FILE",
        help="file holding the enrolment passphrase (secondsitectl passphrase)",
    )
    group.add_argument("--advertise", metavar="HOST:PORT",
                       help="address peers reach this server at (default: the listen "
                            "address, or this host's name when listening on all)")  # fmt: skip


def advertised(given: str | None, host: str, port: int) -> str:
    if given:
        return given
    if host in ("0.0.0.0", "::", ""):
        host = socket.getfqdn()
    return f"{host}:{port}"


def enrol_and_exit(
    args: argparse.Namespace, state_dir: Path, name: str, kind: str, facts: dict[str, Any]
) -> int:
    """`--enroll`: the exchange, then the files under STATE; prints what it got."""
    from appliance.daemon.enrolled import enrol

    if args.passphrase_file is None:
        raise ConfigError(
            "--enroll needs --passphrase-file",
            "secondsitectl passphrase prints it on the configuration server",
        )
    host = str(facts["address"]).rpartition(":")[0].strip("[]")
    make_dirs(state_dir)
    enrolled = enrol(state_dir, args.enroll, args.passphrase_file, name=name, kind=kind,
                     sans=[host], facts=facts, stem=kind)  # fmt: skip
    print(f"enrolled {name} as a {kind} server with {enrolled.config_server} "
          f"(certificate {enrolled.serial}); start the daemon to begin reporting")  # fmt: skip
    return 0


def config_path(given: Path | None, default: Path) -> Path | None:
    """The file to read: the one given, else the default if it exists, else none."""
    if given is not None:
        return given
    return default if default.exists() else None


def tls_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """The server's TLS context, or one operator-readable line about what is missing."""
    for what, file in (("certificate", cert), ("key", key), ("CA certificate", ca)):
        if not file.is_file():
            raise ConfigError(
                f"TLS {what} {file} does not exist",
                "enrol this server with the configuration server, "
                "or set tls.cert, tls.key and tls.ca",
            )
    try:
        return server_context(cert, key, ca)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"cannot load the TLS material: {exc}") from None


def make_dirs(*directories: Path) -> None:
    for directory in directories:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise Unavailable(f"cannot create {directory}: {exc.strerror}") from None


async def listen(start: Callable[[], Awaitable[T]], host: str, port: int) -> T:
    try:
        return await start()
    except OSError as exc:
        hint = "another process holds the port" if exc.errno == errno.EADDRINUSE else None
        raise Unavailable(f"cannot listen on {host}:{port}: {exc}", hint) from None


async def serve_until_stopped(
    notifier: Notifier,
    ready: str,
    status: Callable[[], str],
    background: list[Coroutine[Any, Any, None]],
) -> None:
    """READY, then STATUS and WATCHDOG pings until SIGTERM/SIGINT; background tasks run
    meanwhile and are cancelled on the way out."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.create_task(c) for c in background]
    tasks.append(asyncio.create_task(_status_loop(notifier, status)))
    notifier.ready(ready)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _status_loop(notifier: Notifier, status: Callable[[], str]) -> None:
    # The watchdog ping comes from the event loop itself: a stuck loop stops it.
    step = min(notifier.watchdog_interval or 10.0, 10.0)
    since_status = 10.0
    while True:
        notifier.watchdog()
        if since_status >= 10.0:
            notifier.status(status())
            since_status = 0.0
        await asyncio.sleep(step)
        since_status += step
