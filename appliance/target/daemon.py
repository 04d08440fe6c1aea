"""`secondsite-targetd`: the master target daemon."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import logging
import signal
import ssl
import sys
from pathlib import Path

import uvloop

from appliance.daemon.cli import ConfigError, Unavailable, run_main
from appliance.daemon.logs import setup_logging
from appliance.daemon.sdnotify import Notifier
from appliance.settings import describe
from appliance.target.config import DEFAULT_CONFIG, TARGET_SETTINGS, TargetConfig
from appliance.target.server import TargetService
from appliance.target.store import ReplicaStore, StoreSettings
from appliance.wire.connection import start_server
from appliance.wire.errors import ErrorCounters
from appliance.wire.tls import server_context

PROG = "secondsite-targetd"
log = logging.getLogger("secondsite.targetd")

DESCRIPTION = """\
The Secondsite master target. It receives replicated changes from process servers
over TLS (mutual certificates from the configuration server's CA), applies them to
replica disks (monolithicFlat VMDKs in the datastore directory), keeps an undo journal
so that any recovery point inside the retention window can be rebuilt, and
acknowledges a change only once it is durable. After a crash the replicas are rolled
back to the last acknowledged state and senders resend the rest.
"""

EPILOG = f"""\
configuration file keys (TOML, [section] name = value):
{describe(TARGET_SETTINGS)}

files:
  {DEFAULT_CONFIG}   configuration (optional; defaults apply when absent)
  STATE/catalogue.db              recovery-point catalogue (SQLite, WAL)
  STATE/journal/DISK/             undo journal segments
  DATASTORE/DISK/DISK.vmdk        replica disks (descriptor + -flat.vmdk)

exit status:
  0 stopped cleanly, 2 bad command line, 3 bad configuration,
  4 a resource (port, directory) could not be used, 1 other failure.

Under systemd (Type=notify) it sends READY=1 once serving, STATUS= lines with the
number of disks and connections, and WATCHDOG=1 when WatchdogSec= is set.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help=f"configuration file (default {DEFAULT_CONFIG}, used only if it exists)",
    )
    parser.add_argument(
        "--state-dir", metavar="DIR", help="state directory (overrides server.state_dir)"
    )
    parser.add_argument("--listen", metavar="HOST:PORT", help="overrides server.listen")
    parser.add_argument("--datastore", metavar="DIR", help="overrides storage.datastore")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="print the resolved configuration as JSON and exit",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_main(PROG, lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    path = args.config
    if path is None and DEFAULT_CONFIG.exists():
        path = DEFAULT_CONFIG
    config = TargetConfig.load(
        path,
        {
            "server.state_dir": args.state_dir,
            "server.listen": args.listen,
            "storage.datastore": args.datastore,
        },
    )
    if args.check_config:
        json.dump(config.as_dict(), sys.stdout, indent=2)
        print()
        return 0
    for name in ("tls_cert", "tls_key", "tls_ca"):
        file = getattr(config, name)
        if not file.is_file():
            raise ConfigError(
                f"{name.replace('_', ' ')} {file} does not exist",
                "enrol this master target with the configuration server, "
                "or set tls.cert, tls.key and tls.ca",
            )
    for directory in (config.state_dir, config.datastore):
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise Unavailable(f"cannot create {directory}: {exc.strerror}") from None
    uvloop.run(serve(config))
    return 0


async def serve(config: TargetConfig, notifier: Notifier | None = None) -> None:
    notifier = notifier or Notifier()
    try:
        ssl_context = server_context(config.tls_cert, config.tls_key, config.tls_ca)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"cannot load the TLS material: {exc}") from None
    store = ReplicaStore(
        config.state_dir,
        config.datastore,
        StoreSettings(
            journal_level=config.journal_level,
            segment_bytes=config.segment_bytes,
            batch_bytes=config.batch_bytes,
            retention_seconds=config.retention_seconds,
            retention_bytes=config.retention_bytes,
        ),
    )
    counters = ErrorCounters()
    service = TargetService(
        store,
        name=config.name,
        datastore=config.datastore,
        window_bytes=config.window_bytes,
        checkpoint_seconds=config.checkpoint_seconds,
        counters=counters,
    )
    try:
        server = await start_server(
            service.handle, config.host, config.port, ssl_context, counters=counters
        )
    except OSError as exc:
        store.close()
        hint = "another process holds the port" if exc.errno == errno.EADDRINUSE else None
        raise Unavailable(f"cannot listen on {config.host}:{config.port}: {exc}", hint) from None

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    background = [asyncio.create_task(_status_loop(service, notifier))]
    if config.prune_seconds:
        background.append(asyncio.create_task(_prune_loop(store, config.prune_seconds)))
    log.info("serving on %s:%d, datastore %s", config.host, config.port, config.datastore)
    notifier.ready(f"Serving on {config.host}:{config.port}")
    await stop.wait()

    log.info("stopping: making received changes durable")
    notifier.stopping("Making received changes durable")
    server.close()
    for task in background:
        task.cancel()
    await asyncio.gather(*background, return_exceptions=True)
    await service.shutdown()
    store.close()
    log.info("stopped")


async def _status_loop(service: TargetService, notifier: Notifier) -> None:
    interval = notifier.watchdog_interval or 10.0
    tick = 0.0
    while True:
        notifier.watchdog()
        if tick <= 0:
            status = service.status()
            notifier.status(f"{len(status['disks'])} disks, {status['connections']} connections")
            tick = 10.0
        await asyncio.sleep(min(interval, 10.0))
        tick -= min(interval, 10.0)


async def _prune_loop(store: ReplicaStore, every: float) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(every)
        report = await loop.run_in_executor(None, store.prune)
        with contextlib.suppress(AttributeError):
            if report.points_removed:
                log.info("retention: %s", report)
